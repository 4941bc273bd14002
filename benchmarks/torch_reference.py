r"""The same train steps in PyTorch (eager, and optionally torch.compile), the baseline of benchmarks/train_step.py.

    python -m benchmarks.torch_reference --method csl unimatch --depth 101 --output-stride 16 \
        --crop 513 --dtype float32 bfloat16 --out torch_reference.json [--compile] [--strict-fp32]
    python -m benchmarks.torch_reference --method unimatch_v2 --encoder small --crop 518 \
        --labeled 16 --unlabeled 16 --dtype float32 bfloat16      # UniMatch V2 on DINOv2 + DPT
    python -m benchmarks.torch_reference --tiny    # CPU smoke test

A compact DeepLabV3+ in UniMatch's layout (deep stem, torchvision dilation schedule, ASPP, 48-ch
reduce, two 3x3 fuse convs, FP by Dropout2d(0.5) on c1 and c4) and the UniMatch/CSL/supervised
steps written the way the reference code runs them, with the options of the csl_jax configs
(configs/*_pascal.py): pseudo-labels without gradient (EMA teacher on [u_w; u'_w], or the
student's eval-mode mix pass and its clean u_w logits), CutMix / TMP strong views, the main pass
[x; u_w] with FP and one strong pass, weighted CE, SGD with momentum and a 10x head group, EMA
update. Running-statistics bookkeeping is PyTorch's default (every train-mode pass updates BN);
that changes no cost.

Written to do the work JAX does, no more: the CSL selector's 2-way split is the closed-form 2x2
symmetric eigen-decomposition that csl_jax computes (`spectral_split`; no `torch.linalg.eigh`, which
synchronises a CUDA device with the host, no data-dependent shapes), and the EMA teacher update is
one batched `torch._foreach_lerp_` over the floating parameters and buffers (not a Python loop of
per-tensor `lerp_` launches).

Rows (`variant`) per configuration: `bf16` = bf16 autocast with channels_last model and inputs (the
fast PyTorch recipe); `tf32` = float32 NCHW with PyTorch's defaults, i.e. cuDNN convolutions in
TF32 (`cudnn.allow_tf32=True`; what "PyTorch float32" means in the reference's recipe); with
--strict-fp32 also `fp32` = float32 with TF32 off (true fp32 convolutions). --compile (or --modes eager
compile) adds `*_compile` rows: `Trainer.loss` (every network pass, the pseudo-labels and the losses)
under `torch.compile(mode=--compile-mode, backend=--compile-backend)`; backward, optimizer and EMA
stay eager, and the compile time lands in `first_step_s`.

UniMatch V2's methods (`unimatch_v2`, `fixmatch_v2`, `supervised_v2`; `V2Trainer`) run the DINOv2 +
DPT of the test transcription tests/helpers/torch_dinov2_dpt.py (written from the spec) with its
attention through `F.scaled_dot_product_attention`, on train_step's V2 configs (AdamW, the
method's options); bf16 is autocast alone there.

cuDNN autotuning is on (`cudnn.benchmark`, as UniMatch sets it).
After --warmup steps, --iters steps are timed each ended by torch.cuda.synchronize()
(`ms_per_step_synced`, median; `ms_per_step_min`), then --iters steps back to back with one
synchronize at the end (`ms_per_step`, the figure compared). Writes JSON and prints a table last.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.train_step import (V2_METHODS, batch_streams, configurations, model_keys, model_label,
                                   synthetic_batch, unlabeled_views)
from csl_jax.constants import IGNORE_INDEX as IGNORE
from csl_jax.methods import build_method
from csl_jax.models import build_model
from csl_jax.models.resnet import EXPANSION, block_schedule, resolve_blocks
from tests.helpers import torch_dinov2_dpt


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1, relu: bool = True) -> nn.Sequential:
    """k x k conv (padding dilation * (k - 1) / 2, no bias) -> BN [-> ReLU]."""
    layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck; the first block of a layer has the projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride, dilation),
                                  conv_bn(width, width * EXPANSION, 1, relu=False))
        self.shortcut = conv_bn(cin, width * EXPANSION, 1, stride, relu=False) if downsample else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (UniMatch layout). forward(x NCHW, fp) -> logits (B, C, H, W), or (clean, fp)."""

    def __init__(self, num_classes: int, depth: int, output_stride: int, aspp_rates, width: int = 64,
                 blocks=None, head_width: int = 256, reduce_width: int = 48):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 3, 2), conv_bn(width, width, 3), conv_bn(width, 2 * width, 3),
                                  nn.MaxPool2d(3, 2, 1))
        cin, layers = 2 * width, []
        for li, layer in enumerate(block_schedule(resolve_blocks(depth, blocks), output_stride)):
            blocks_of_layer = []
            for bi, (stride, dilation) in enumerate(layer):
                blocks_of_layer.append(Bottleneck(cin, width * 2 ** li, stride, dilation, bi == 0))
                cin = width * 2 ** li * EXPANSION
            layers.append(nn.Sequential(*blocks_of_layer))
        self.layers = nn.ModuleList(layers)
        self.aspp = nn.ModuleList([conv_bn(cin, head_width, 1)]
                                  + [conv_bn(cin, head_width, 3, 1, r) for r in aspp_rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn(cin, head_width, 1))
        self.project = conv_bn(head_width * (len(aspp_rates) + 2), head_width, 1)
        self.reduce = conv_bn(width * EXPANSION, reduce_width, 1)
        self.fuse = nn.Sequential(conv_bn(reduce_width + head_width, head_width, 3), conv_bn(head_width, head_width, 3))
        self.classifier = nn.Conv2d(head_width, num_classes, 1)

    def forward(self, x, fp: bool = False):
        h, w = x.shape[-2:]
        x = self.stem(x)
        c1 = x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(x)
        c4 = x
        if fp:
            c1 = torch.cat([c1, F.dropout2d(c1, 0.5, self.training)])
            c4 = torch.cat([c4, F.dropout2d(c4, 0.5, self.training)])
        pooled = self.pool(c4).expand(-1, -1, *c4.shape[-2:])
        high = self.project(torch.cat([branch(c4) for branch in self.aspp] + [pooled], 1))
        high = F.interpolate(high, c1.shape[-2:], mode="bilinear", align_corners=True)
        out = self.classifier(self.fuse(torch.cat([self.reduce(c1), high], 1)))
        out = F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
        return out.chunk(2) if fp else out


# ---------------------------------------------------------------------------------------------
# Pseudo-labels and losses (float32)
# ---------------------------------------------------------------------------------------------
def _power_of_two_scale(max_v):
    """rho = 2^-floor(log2 max_v), clipped to [2^-126, 2^126]; 1 where max_v = 0 (as csl_jax: from the
    float32 exponent bits, exact, no denormals)."""
    exponent = (max_v.view(torch.int32) >> 23) - 127
    rho = (((-exponent).clamp(-126, 126) + 127) << 23).view(torch.float32)  # 2^k from its exponent bits
    return torch.where(max_v > 0, rho, torch.ones_like(max_v))


def spectral_split(p, v, valid):
    """Closed-form 2-way spectral split of each image (csl_jax.methods.parts.pseudo_labels._spectral_assignment,
    batched): the 2x2 moment matrix of the features in the frame of the image's mean feature, its leading
    eigenvalue and eigenvector by formula, scores |x . u_k| / sqrt(lambda_k). No `torch.linalg.eigh` (which
    synchronises a CUDA device with the host), no data-dependent shapes: pure elementwise ops and sums.

    p, v: (B, N) float32 features; valid: (B, N) bool. Returns (B, N) bool: True = second cluster.
    """
    zero = torch.zeros_like(p)
    rho = _power_of_two_scale(torch.where(valid, v, zero).amax(1, keepdim=True))       # (B, 1)
    count = valid.sum(1, keepdim=True).clamp_min(1).float()
    p = torch.where(valid, p, zero)
    v_s = torch.where(valid, v * rho, zero)  # suffix _s: scaled units (times rho for v, rho^2 for v^2)
    p_mean, v_mean_s = p.sum(1, keepdim=True) / count, v_s.sum(1, keepdim=True) / count
    a = p_mean * p + v_mean_s * v_s / (rho * rho)
    b_s = torch.where(valid, p_mean * (v_s - v_mean_s) - v_mean_s * (p - p_mean), zero)
    s_aa, m_ab_s, m_bb_s = ((u * w).sum(1, keepdim=True) for u, w in ((a, a), (a, b_s), (b_s, b_s)))
    s_ab, s_bb = m_ab_s / rho, m_bb_s / (rho * rho)
    h = (s_aa - s_bb) / 2
    lam1 = (s_aa + s_bb) / 2 + torch.sqrt(h * h + s_ab * s_ab)
    lam2_s = torch.where(lam1 > 0, (s_aa * m_bb_s - m_ab_s * m_ab_s).clamp_min(0.0) / lam1, torch.zeros_like(lam1))
    first = s_aa >= s_bb  # leading eigenvector u1 = (e1, e2) / n, u2 = (-e2, e1) / n; e2_s = rho e2
    e1 = torch.where(first, lam1 - s_bb, s_ab)
    e2_s = torch.where(first, m_ab_s, rho * (lam1 - s_aa))
    n = torch.sqrt(e1 * e1 + (e2_s / rho) ** 2)
    degenerate = n == 0  # M proportional to I: u1 = (1, 0) in the original frame
    e1 = torch.where(degenerate, p_mean, e1)
    e2_s = torch.where(degenerate, -v_mean_s, e2_s)
    n = torch.where(degenerate, torch.sqrt(p_mean * p_mean + (v_mean_s / rho) ** 2), n)
    denom0, denom1 = n * torch.sqrt(lam1), n * torch.sqrt(lam2_s)
    s0 = (a * e1 + b_s * e2_s / (rho * rho)).abs() / torch.where(denom0 > 0, denom0, torch.ones_like(denom0))
    s1 = (b_s * e1 - a * e2_s).abs() / torch.where(denom1 > 0, denom1, torch.full_like(denom1, float("inf")))
    return valid & (s1 > s0)


def csl_weights(probs, valid, alpha: float, eps: float):
    """CSL soft weights: per-image 2-way spectral split of (conf, residual variance) in closed form
    (`spectral_split`, the computation of csl_jax), Gaussian weights around the more confident cluster.

    probs (B, C, H, W) float32, valid (B, H, W) bool -> (weights float32, reliable bool), (B, H, W).
    """
    b, c = probs.shape[:2]
    conf, arg = probs.max(1)
    rest = probs.scatter(1, arg[:, None], 0.0)
    var = ((rest - ((1 - conf) / (c - 1))[:, None]) ** 2).sum(1) / (c - 1)
    x = torch.stack([conf, var], -1).reshape(b, -1, 2)                  # (B, N, 2)
    m = valid.reshape(b, -1)
    second = spectral_split(x[..., 0], x[..., 1], m)
    member = torch.stack([~second, second], 1) & m[:, None]             # (B, 2, N)
    count = member.sum(-1, keepdim=True).float()                        # (B, 2, 1)
    mf = member.float()
    mean = torch.einsum("bkn,bni->bki", mf, x) / count.clamp_min(1)
    sq = torch.einsum("bkn,bkni->bki", mf, (x[:, None] - mean[:, :, None]) ** 2)
    variance = sq / (count - 1).clamp_min(1)
    pick = (mean[:, 1, 0] > mean[:, 0, 0]).long().view(b, 1, 1).expand(b, 1, 2)  # the reliable cluster
    mu = mean.gather(1, pick)[:, None]                                  # (B, 1, 1, 2), on the device
    sigma2 = variance.gather(1, pick)[:, None]
    z_c = (conf - mu[..., 0]) / (sigma2[..., 0] + eps).sqrt()
    z_v = (mu[..., 1] - var) / (sigma2[..., 1] + eps).sqrt()
    soft = torch.exp(-z_c ** 2 / alpha) * torch.exp(-z_v ** 2 / alpha)
    weights = torch.where((z_c > 0) | (z_v > 0), torch.ones_like(soft), soft) * valid
    return weights, valid & (weights == 1)


def targets(logits, ignore, opts):
    """Pseudo-label targets of no-grad logits: ((label, weight, ignore), reliable)."""
    probs = logits.float().softmax(1)
    valid = ignore != IGNORE
    if opts.selector == "csl":
        with torch.autocast(probs.device.type, enabled=False):  # float32, as the reference and csl_jax
            weight, reliable = csl_weights(probs, valid, opts.alpha, opts.eps)
    else:
        reliable = valid & (probs.max(1)[0] >= opts.tau)
        weight = reliable.float()
    return (probs.argmax(1), weight, ignore), reliable


def weighted_ce(logits, target) -> torch.Tensor:
    """sum w * CE over valid pixels / number of valid pixels (float32)."""
    label, weight, ignore = target
    valid = ignore != IGNORE
    ce = F.cross_entropy(logits.float(), torch.where(valid, label, IGNORE), ignore_index=IGNORE, reduction="none")
    return (ce * weight).sum() / valid.sum().clamp_min(1)


def cutmix(box, mixed_in, own):
    """where(box, mixed_in, own) for matching tuples/tensors; box (B, H, W) bool."""
    if isinstance(own, tuple):
        return tuple(cutmix(box, m, o) for m, o in zip(mixed_in, own))
    return torch.where(box[:, None] if own.dim() == 4 else box, mixed_in, own)


# ---------------------------------------------------------------------------------------------
# Train steps
# ---------------------------------------------------------------------------------------------
class Trainer:
    """One optimizer step of `config`'s method on a batch of NCHW tensors (see the module docstring)."""

    def __init__(self, config, num_classes: int, device, bf16: bool):
        m = config.model
        model = DeepLabV3Plus(num_classes, m.depth, m.output_stride, m.aspp_rates, m.width, m.blocks, m.head_width,
                              m.reduce_width)
        self.memory_format = torch.channels_last if bf16 else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format).train()
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.opts, self.config = config.method, config
        self.teacher = None
        if self.opts.name != "supervised" and self.opts.teacher == "ema":
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        backbone = [p for n, p in self.model.named_parameters() if n.startswith(("stem", "layers"))]
        head = [p for n, p in self.model.named_parameters() if not n.startswith(("stem", "layers"))]
        o = config.optim
        self.optimizer = torch.optim.SGD([{"params": backbone, "lr": o.lr}, {"params": head, "lr": o.lr * o.lr_multi}],
                                         lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.step_count = 0

    def to_device(self, batch: dict, device) -> dict:
        """Host numpy batch -> tensors: images NCHW float32 (channels_last for bf16), masks as they are."""
        def convert(x):
            t = torch.from_numpy(x).to(device)
            return t.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format) if x.ndim == 4 else t
        return {stream: {k: convert(v) for k, v in arrays.items()} for stream, arrays in batch.items()}

    def loss(self, batch) -> torch.Tensor:
        """The method's loss (L_x for supervised; (L_x + strong + 0.5 L_fp) / 2 otherwise)."""
        lab, o, model = batch["labeled"], self.opts, self.model
        if o.name == "supervised":
            with self.autocast():
                logits = model(lab["image"])
            return F.cross_entropy(logits.float(), lab["label"].long(), ignore_index=IGNORE)
        unl, mix = batch["unlabeled"], batch["mix"]
        n_lab, n_unl = lab["image"].shape[0], unl["weak"].shape[0]
        with torch.no_grad(), self.autocast():
            if self.teacher is not None:
                t_logits = self.teacher(torch.cat([unl["weak"], mix["weak"]]))
                main_t, reliable = targets(t_logits[:n_unl], unl["ignore"], o)
                mix_t, _ = targets(t_logits[n_unl:], mix["ignore"], o)
            else:
                model.eval()
                mix_t, _ = targets(model(mix["weak"]), mix["ignore"], o)
                model.train()
        with self.autocast():
            main_in = torch.cat([lab["image"], unl["weak"]])
            logits, logits_fp = model(main_in, fp=True) if o.use_fp else (model(main_in), None)
            if self.teacher is None:
                with torch.no_grad():
                    main_t, reliable = targets(logits[n_lab:], unl["ignore"], o)
            strong = [cutmix(unl["cutmix_box"], mix["strong"], unl["strong"])]
            tgts = [cutmix(unl["cutmix_box"], mix_t, main_t)]
            if o.second_view == "tmp":
                keep = ~(reliable & unl["block_mask"])[:, None]
                strong.append(unl["tmp"] * keep)
                tgts.append(main_t)
            elif o.second_view == "cutmix":
                strong.append(cutmix(unl["cutmix_box2"], mix["strong2"], unl["strong2"]))
                tgts.append(cutmix(unl["cutmix_box2"], mix_t, main_t))
            strong_logits = model(torch.cat(strong)).chunk(len(strong))
        loss_x = F.cross_entropy(logits[:n_lab].float(), lab["label"].long(), ignore_index=IGNORE)
        share = (0.5 if o.use_fp else 1.0) / len(strong)
        unlabeled = share * sum(weighted_ce(z, t) for z, t in zip(strong_logits, tgts))
        if o.use_fp:
            unlabeled = unlabeled + 0.5 * weighted_ce(logits_fp[n_lab:], main_t)
        return (loss_x + unlabeled) / 2

    def step(self, batch) -> torch.Tensor:
        """One optimizer step (and EMA update); returns the loss tensor (not synchronised)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            with torch.no_grad():
                self.update_teacher(min(1 - 1 / (self.step_count + 1), self.opts.ema_momentum))
        self.step_count += 1
        return loss

    def ema_pairs(self) -> tuple[list, list]:
        """(teacher tensors, student tensors): every floating parameter and buffer, in matching order
        (the tensors are updated in place, so the lists stay valid; built once)."""
        if getattr(self, "_ema_pairs", None) is None:
            pairs = [(t, s) for t, s in zip(itertools.chain(self.teacher.parameters(), self.teacher.buffers()),
                                            itertools.chain(self.model.parameters(), self.model.buffers()))
                     if t.is_floating_point()]
            self._ema_pairs = [t for t, _ in pairs], [s for _, s in pairs]
        return self._ema_pairs

    def update_teacher(self, decay: float) -> None:
        """EMA of every floating parameter and buffer, t <- decay t + (1 - decay) s, in one batched
        `torch._foreach_lerp_` (multi-tensor kernels on CUDA, not one launch per tensor)."""
        teacher, student = self.ema_pairs()
        torch._foreach_lerp_(teacher, student, 1 - decay)


class SdpaAttention(torch_dinov2_dpt.Attention):
    """The transcription's attention through `F.scaled_dot_product_attention` (flash / memory-efficient
    kernels on GPU, as the official code's xFormers MemEffAttention): same qkv and proj, scale hd^-0.5."""

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def reversed_groups(x, group: int):
    """x[partner]: each consecutive group of `group` samples reversed (UniMatch V2's per-GPU flip(0))."""
    return x.reshape(-1, group, *x.shape[1:]).flip(1).reshape(x.shape)


def comp_drop_masks(batch: int, dim: int, group: int, keep: float, scale: float, device):
    """Complementary Dropout masks [m1; m2] (2B, D) (spec §3): m1 = scale * Bernoulli(0.5), m2 = scale - m1,
    both 1 for the first floor(g * keep) images of a random permutation of each group of g."""
    m1 = scale * torch.randint(0, 2, (batch, dim), device=device).float()
    m2 = scale - m1
    for start in range(0, batch, group):
        kept = start + torch.randperm(group, device=device)[:int(group * keep)]
        m1[kept] = m2[kept] = 1.0
    return torch.cat([m1, m2])


class V2Trainer(Trainer):
    """One optimizer step of UniMatch V2 / FixMatch V2 / supervised on the DINOv2 + DPT (the transcription
    of tests/helpers/torch_dinov2_dpt.py, attention by `SdpaAttention`), written the way UniMatch-V2's
    loop runs it: the EMA teacher's no-grad pass on u_w, CutMix of the strong views with the reversed
    group's, the student on x and on [S1; S2] with the Complementary Dropout masks, CE losses,
    AdamW (backbone lr, head lr x lr_multi), EMA by `torch._foreach_lerp_`. bf16 is autocast alone
    (a ViT has no channels_last layout to choose)."""

    def __init__(self, config, num_classes: int, device, bf16: bool):  # Trainer's step and to_device, not its model
        if config.method.name != "supervised" and config.method.second_view not in ("cutmix", "none"):
            raise ValueError(f"the PyTorch V2 step has no second_view={config.method.second_view!r}")
        m = build_model(config.model, num_classes)  # the csl_jax fields (encoder or TINY_DPT)
        model = torch_dinov2_dpt.DPT(num_classes, m.embed_dim, m.depth, m.num_heads, m.taps, m.features,
                                     m.out_channels, m.ffn, m.pos_grid)
        for module in model.modules():
            if isinstance(module, torch_dinov2_dpt.Attention):
                module.__class__ = SdpaAttention
        self.model = model.to(device).train()
        self.memory_format = torch.contiguous_format
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.opts, self.config = config.method, config
        self.teacher = None
        if self.opts.name != "supervised":
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.")]
        head = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        o = config.optim
        groups = [{"params": backbone, "lr": o.lr}, {"params": head, "lr": o.lr * o.lr_multi}]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        self.step_count = 0

    def loss(self, batch) -> torch.Tensor:
        """L_x (supervised), or (L_x + mean over the strong views of L_sk) / 2 (spec §5)."""
        lab, o, model, group = batch["labeled"], self.opts, self.model, self.config.loss.group_size
        with self.autocast():
            logits_x = model(lab["image"])
        loss_x = F.cross_entropy(logits_x.float(), lab["label"].long(), ignore_index=IGNORE)
        if o.name == "supervised":
            return loss_x
        unl = batch["unlabeled"]
        with torch.no_grad(), self.autocast():
            own, _ = targets(self.teacher(unl["weak"]), unl["ignore"], o)
        partner = tuple(reversed_groups(t, group) for t in own)
        boxes = ["cutmix_box"] + (["cutmix_box2"] if o.second_view == "cutmix" else [])
        views = [cutmix(unl[box], reversed_groups(unl[view], group), unl[view])
                 for box, view in zip(boxes, ("strong", "strong2"))]
        tgts = [cutmix(unl[box], partner, own) for box in boxes]
        scale = None
        if o.comp_drop and len(views) == 2:
            scale = comp_drop_masks(unl["weak"].shape[0], model.backbone.cls_token.shape[-1], group,
                                    o.comp_drop_keep, o.comp_drop_scale, lab["image"].device)
        with self.autocast():
            strong_logits = model(torch.cat(views), feature_scale=scale).chunk(len(views))
        unlabeled = sum(weighted_ce(z, t) for z, t in zip(strong_logits, tgts)) / len(views)
        return (loss_x + unlabeled) / 2

    def update_teacher(self, decay: float) -> None:
        """EMA of the parameters (the DPT has no buffers) in one `torch._foreach_lerp_`."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.model.parameters()), 1 - decay)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_name(dtype: str, tf32: bool, compiled: bool) -> str:
    """'bf16' (autocast + channels_last), 'tf32' (float32 with PyTorch's default TF32 convolutions) or
    'fp32' (float32, TF32 off), with '_compile' for the torch.compile rows."""
    base = "bf16" if dtype == "bfloat16" else ("tf32" if tf32 else "fp32")
    return base + ("_compile" if compiled else "")


@contextlib.contextmanager
def tf32_setting(allow: bool):
    """cuDNN convolutions in TF32 (`allow`, PyTorch's default) or in true float32; cuBLAS matmuls keep
    PyTorch's default (exact float32) either way. Restored on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = saved[1] and allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bench_one(config, num_classes: int, device, warmup: int, iters: int, tf32: bool = True,
              compile_mode: str | None = None, compile_backend: str = "inductor") -> dict:
    """Times `config`'s step in PyTorch on `device`; returns one result dict (keys as train_step's).

    `tf32`: cuDNN's TF32 convolutions (PyTorch's default; what float32 means in the reference's
    recipe); False runs float32 convolutions in true float32. `compile_mode`: wrap the step's
    forward part (every network pass, the pseudo-labels and the losses: `Trainer.loss`) in
    `torch.compile(mode=compile_mode, backend=compile_backend)`; its compile time lands in
    `first_step_s`. The backward, the optimizer and the EMA stay eager.
    """
    bf16 = config.model.dtype == "bfloat16"
    dpt = config.model.get("name") == "dpt"
    method = build_method(config, num_classes)
    views = unlabeled_views(method)
    labeled, unlabeled = config.batch.labeled, config.batch.unlabeled
    torch.manual_seed(config.seed)
    trainer = (V2Trainer if dpt else Trainer)(config, num_classes, device, bf16)
    if compile_mode is not None:
        torch._dynamo.reset()  # a fresh cache per configuration (no recompile-limit fallback to eager)
        trainer.loss = torch.compile(trainer.loss, mode=compile_mode, backend=compile_backend)
    batch = trainer.to_device(synthetic_batch(views, labeled, unlabeled, config.data.crop_size, num_classes,
                                              streams=batch_streams(method, config)), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tf32_setting(tf32):
        start = time.perf_counter()
        trainer.step(batch)
        _sync(device)
        first_s = time.perf_counter() - start
        for _ in range(warmup):
            trainer.step(batch)
        _sync(device)
        times = []  # each step waited for
        for _ in range(iters):
            start = time.perf_counter()
            loss = trainer.step(batch)
            _sync(device)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()  # queued back to back, synchronised once (as train_step.py times JAX)
        for _ in range(iters):
            loss = trainer.step(batch)
        _sync(device)
        step_s = (time.perf_counter() - start) / iters
    images = labeled + (unlabeled if views is not None else 0)
    compiled = compile_mode is not None
    if bf16:
        recipe = "bf16 autocast" + ("" if dpt else " + channels_last")
    else:
        recipe = "float32 NCHW, " + ("TF32 convs (default)" if tf32 else "TF32 off")
    return {
        "method": config.method.name, **model_keys(config), "crop": config.data.crop_size, "dtype": config.model.dtype,
        "labeled": labeled, "unlabeled": unlabeled if views is not None else 0,
        "variant": variant_name(config.model.dtype, tf32, compiled), "tf32": tf32, "compiled": compiled,
        "compile_mode": compile_mode, "compile_backend": compile_backend if compiled else None,
        "recipe": recipe + (" + torch.compile" if compiled else ""),
        "ms_per_step": 1e3 * step_s, "ms_per_step_synced": 1e3 * statistics.median(times),
        "ms_per_step_min": 1e3 * min(times), "images_per_s": images / step_s,
        "first_step_s": first_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "final_loss": float(loss.detach()),
    }


def variants(dtype: str, modes, strict_fp32: bool):
    """(tf32, compile) of each row of one configuration: eager and/or compiled; float32 as TF32 (PyTorch's
    default), plus true float32 with `strict_fp32`."""
    tf32s = [True] if dtype == "bfloat16" else [True] + ([False] if strict_fp32 else [])
    return [(tf32, mode == "compile") for mode in modes for tf32 in tf32s]


def main(argv=None) -> dict:
    """Runs the grid; returns the report written to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", choices=["supervised", "unimatch", "csl", *sorted(V2_METHODS)],
                        help="default: csl (--tiny: supervised unimatch csl)")
    parser.add_argument("--depth", type=int, nargs="+", default=[101], choices=[50, 101])
    parser.add_argument("--output-stride", type=int, nargs="+", default=[16], choices=[8, 16])
    parser.add_argument("--encoder", nargs="+", default=["small"], choices=["small", "base", "large", "giant"],
                        help="DINOv2 size of the V2 methods (--tiny: train_step.TINY_DPT)")
    parser.add_argument("--crop", type=int, nargs="+", help="default: 513 (--tiny: 33); DPT 518 (--tiny: 28)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--unlabeled", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"],
                        help="eager and/or torch.compile of each configuration (`compile` rows: see bench_one)")
    parser.add_argument("--compile", action="store_true", help="shorthand for --modes eager compile")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default | reduce-overhead | max-autotune | ...")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend ('eager' traces with dynamo only: the CPU tests' plumbing check)")
    parser.add_argument("--strict-fp32", action="store_true",
                        help="float32 also with TF32 off (true fp32), next to PyTorch's default TF32 convolutions")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny model, R50 OS8, batch 2+2, one thread, 1+2 iterations")
    parser.add_argument("--out", default="torch_reference.json")
    args = parser.parse_args(argv)
    args.remat = False  # a JAX option; train_step.configurations reads it
    if args.compile and "compile" not in args.modes:
        args.modes = [*args.modes, "compile"]
    if args.tiny:
        args.method = args.method or ["supervised", "unimatch", "csl"]
        args.depth, args.output_stride, args.labeled, args.unlabeled = [50], [8], 2, 2
        args.warmup, args.iters = 1, 2
        torch.set_num_threads(1)  # shared CI cores: more threads only thrash at this size
    args.method = args.method or ["csl"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    # The fast recipe UniMatch itself uses: cuDNN picks its algorithms per shape (first steps).
    # float32 keeps PyTorch's defaults (TF32 convolutions on Ampere and later, exact fp32 matmuls): the
    # 'tf32' rows; --strict-fp32 adds 'fp32' rows with TF32 off.
    torch.backends.cudnn.benchmark = True
    settings = {"cudnn.benchmark": torch.backends.cudnn.benchmark,
                "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "modes": args.modes, "compile_mode": args.compile_mode if "compile" in args.modes else None,
                "compile_backend": args.compile_backend if "compile" in args.modes else None,
                "strict_fp32": args.strict_fp32, "csl_split": "closed form 2x2 (no eigh, no host sync)",
                "ema": "torch._foreach_lerp_"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    for config, _ in configurations(args):  # train_step's grid: the same configs, default crops per model
        for tf32, compiled in variants(config.model.dtype, args.modes, args.strict_fp32):
            results.append(bench_one(config, args.num_classes, device, args.warmup, args.iters, tf32,
                                     args.compile_mode if compiled else None, args.compile_backend))
            print(json.dumps(results[-1]), flush=True)
    report = {"device": f"{device.type}: {name}", "torch": torch.__version__, "tiny": args.tiny,
              "settings": settings, "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"device: {report['device']} (torch {torch.__version__}); results in {args.out}")
    print(f"{'method':>11} {'model':>5} {'OS':>3} {'crop':>5} {'recipe':>45} {'batch':>6} {'ms/step':>9} "
          f"{'synced':>9} {'img/s':>8} {'1st step s':>10} {'peak GiB':>8}")
    for r in results:
        peak = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"{r['method']:>11} {model_label(r):>5} {r['output_stride'] or '-':>3} {r['crop']:>5} "
              f"{r['recipe']:>45} {str(r['labeled']) + '+' + str(r['unlabeled']):>6} {r['ms_per_step']:>9.1f} "
              f"{r['ms_per_step_synced']:>9.1f} {r['images_per_s']:>8.1f} {r['first_step_s']:>10.1f} {peak:>8}")
    return report


if __name__ == "__main__":
    main()
