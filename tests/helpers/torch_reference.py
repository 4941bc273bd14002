"""PyTorch pieces of more than one test file: the official OHEM cross-entropy and randomised tiny
reference networks in eval mode."""

import torch
import torch.nn as tnn
import torch.nn.functional as F


def randomise_bn(model, gen):
    """Random affine parameters and running statistics in every BatchNorm2d of `model` (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))


def prob_ohem(pred, target, thresh, min_kept, weight=None, ignore=255):
    """`ProbOhemCrossEntropy2d` on one GPU's batch: (B, C, H, W) logits `pred`, (B, H, W) long `target`;
    the cross-entropy with class weights `weight` (None: unweighted) over the valid pixels whose
    probability of their label is at most max(thresh, the min_kept-th smallest of them) (all valid
    pixels when fewer than min_kept). A tensor, differentiable in `pred`.

    The same statements in UniMatch/CCVC's `ProbOhemCrossEntropy2d` and in leofansq/CPCL
    furnace/seg_opr/loss_opr.py lines 159-201 at HEAD f0e1800 (unchanged since ed98ba8, `use_weight`
    passes the class weights), with `masked_fill` where they fill in place (the same values)."""
    b, c, h, w = pred.size()
    target = target.view(-1)
    valid_mask = target.ne(ignore)
    target = target * valid_mask.long()
    num_valid = valid_mask.sum()
    prob = F.softmax(pred, dim=1)
    prob = (prob.transpose(0, 1)).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill(~valid_mask, 1)
        mask_prob = prob[target, torch.arange(len(target), dtype=torch.long)]
        threshold = thresh
        if min_kept > 0:
            _, index = mask_prob.sort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept_mask = mask_prob.le(threshold)
            target = target * kept_mask.long()
            valid_mask = valid_mask * kept_mask
    target = target.masked_fill(~valid_mask, ignore).view(b, h, w)
    return torch.nn.CrossEntropyLoss(weight=weight, ignore_index=ignore)(pred, target)


def randomised_eval(build, seed, branch_logits):
    """`build()` (a torch network, its weights drawn after `torch.manual_seed(seed)`) in eval mode with
    random BN affine parameters and running statistics (`randomise_bn`, generator seed + 1), each
    classifier scaled so that its logits on one random batch x (2 x 3 x 65 x 65, the same generator)
    have std 1: `branch_logits(model, x)` yields (module with the `.classifier` conv, its logits on x),
    one branch after the other."""
    torch.manual_seed(seed)
    model = build()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        randomise_bn(model, gen)
        model.eval()
        x = torch.randn(2, 3, 65, 65, generator=gen)
        for branch, logits in branch_logits(model, x):
            std = logits.std()
            branch.classifier.weight /= std
            branch.classifier.bias /= std
    return model
