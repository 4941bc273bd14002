"""U2PL loss pieces against float64 NumPy / PyTorch transcriptions of the official formulas
(Haochen-Wang409/U2PL at ab3d2be313d4d6b2885e7a0213d4fce82a803b79, the latest commit; the published
code, unchanged since the release 53bbdd2: u2pl/utils/loss_helper.py, u2pl/utils/utils.py,
train_semi.py), and the static-shape samplers against the reference's uniform draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csl_jax.methods.parts import resize
from csl_jax.methods.u2pl import contrastive as con
from csl_jax.methods.u2pl import queue as queue_lib
from csl_jax.methods.u2pl import unsup

RNG = np.random.default_rng(0)


# -- percentiles and L_u -----------------------------------------------------------------------
@pytest.mark.parametrize("percent", [0.0, 17.3, 20.0, 50.0, 80.0, 96.5, 100.0])
def test_masked_percentile_is_numpys_linear_interpolation(percent):
    values = RNG.random((3, 50)).astype(np.float32)
    values[1, :10] = values[1, 10]  # ties
    mask = RNG.random((3, 50)) < 0.6
    mask[2] = False
    mask[2, 7] = True  # a single valid entry
    got = np.asarray(unsup.masked_percentile(values, mask, percent))
    want = [np.percentile(values[g][mask[g]].astype(np.float64), percent) for g in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_masked_percentile_of_an_empty_row_is_inf():
    got = unsup.masked_percentile(np.ones((1, 4), np.float32), np.zeros((1, 4), bool), 50.0)
    assert np.isinf(np.asarray(got)).all()


def reference_unsupervised_loss(predict, target, percent, pred_teacher):
    """`compute_unsupervised_loss` in float64 torch (NCHW logits, (B, H, W) targets)."""
    batch_size, _, h, w = predict.shape
    prob = torch.softmax(pred_teacher, dim=1)
    entropy = -torch.sum(prob * torch.log(prob + 1e-10), dim=1)
    thresh = np.percentile(entropy[target != 255].numpy().flatten(), percent)
    thresh_mask = entropy.ge(thresh).bool() * (target != 255).bool()
    target = target.clone()
    target[thresh_mask] = 255
    weight = batch_size * h * w / torch.sum(target != 255)
    return weight * F.cross_entropy(predict, target, ignore_index=255)


@pytest.mark.parametrize("percent", [80.0, 85.0, 100.0])
def test_unsupervised_loss_matches_the_reference_per_group(percent):
    b, h, w, c, g = 4, 9, 7, 5, 2
    logits = RNG.normal(size=(b, h, w, c)).astype(np.float32)
    teacher = (2 * RNG.normal(size=(b, h, w, c))).astype(np.float32)
    pseudo = RNG.integers(0, c, size=(b, h, w)).astype(np.int32)
    ent = unsup.entropy(jax.nn.softmax(jnp.asarray(teacher), axis=-1))
    got, kept = unsup.unsupervised_loss(logits, pseudo, np.ones((b, h, w), bool), ent, percent, group_size=g)
    want = np.mean([reference_unsupervised_loss(
        torch.from_numpy(logits[k:k + g].astype(np.float64)).permute(0, 3, 1, 2),
        torch.from_numpy(pseudo[k:k + g]).long(), percent,
        torch.from_numpy(teacher[k:k + g].astype(np.float64)).permute(0, 3, 1, 2)).item() for k in (0, 2)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if percent < 100:
        assert 0 < np.mean(np.asarray(kept)) < 1


def test_unsupervised_loss_excludes_padding_and_normalises_by_its_valid_pixels():
    b, h, w, c = 2, 6, 6, 4
    logits = RNG.normal(size=(b, h, w, c)).astype(np.float32)
    pseudo = RNG.integers(0, c, size=(b, h, w)).astype(np.int32)
    ent = RNG.random((b, h, w)).astype(np.float32)
    valid = np.ones((b, h, w), bool)
    valid[:, 4:] = False
    got, kept = unsup.unsupervised_loss(logits, pseudo, valid, ent, 80.0, group_size=2)
    thresh = np.percentile(ent[valid].astype(np.float64), 80.0)
    keep = valid & (ent < thresh)
    logp = torch.log_softmax(torch.from_numpy(logits.astype(np.float64)), dim=-1).numpy()
    ce = -np.take_along_axis(logp, pseudo[..., None], axis=-1)[..., 0]
    want = valid.sum() * ce[keep].sum() / keep.sum() ** 2
    np.testing.assert_array_equal(np.asarray(kept), keep)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_drop_percentile_schedule():
    # train_semi.py: 100 - (100 - drop_percent) * (1 - epoch / epochs)
    for epoch in (0, 7, 79):
        np.testing.assert_allclose(float(unsup.drop_percentile(epoch, 80.0, 80.0)), 100 - 20 * (1 - epoch / 80),
                                   rtol=1e-6)


# -- stride-4 masks and labels -----------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out", [(513, 129), (769, 193), (129, 33), (32, 8), (33, 9)])
def test_nearest_downsample_is_torch_legacy_nearest(n_in, n_out):
    x = RNG.integers(0, 255, size=(2, n_in, n_in)).astype(np.int32)
    want = F.interpolate(torch.from_numpy(x)[:, None].double(), size=(n_out, n_out), mode="nearest")[:, 0]
    np.testing.assert_array_equal(np.asarray(resize.downsample_nearest(jnp.asarray(x), (n_out, n_out))), want.numpy())


def reference_label_onehot(inputs, num_segments):
    """The official `label_onehot` (with its scatter along the class axis), on the CPU."""
    batch_size, im_h, im_w = inputs.shape
    outputs = torch.zeros((num_segments, batch_size, im_h, im_w))
    inputs_temp = inputs.clone()
    inputs_temp[inputs == 255] = 0
    outputs.scatter_(0, inputs_temp.unsqueeze(1), 1.0)
    outputs[:, inputs == 255] = 0
    return outputs.permute(1, 0, 2, 3)


def test_one_hot_reference_bug_and_the_per_sample_fix():
    labels = RNG.integers(0, 4, size=(3, 5, 6)).astype(np.int32)
    labels[RNG.random(labels.shape) < 0.2] = 255
    ref = reference_label_onehot(torch.from_numpy(labels).long(), 4).permute(0, 2, 3, 1).numpy().astype(bool)
    np.testing.assert_array_equal(np.asarray(con.one_hot(jnp.asarray(labels), 4, reference=True)), ref)
    fixed = np.asarray(con.one_hot(jnp.asarray(labels), 4))
    want = (labels[..., None] == np.arange(4)) & (labels[..., None] != 255)
    np.testing.assert_array_equal(fixed, want)


def test_rank_mask_matches_the_official_sorted_class_mask():
    probs = torch.softmax(torch.from_numpy(RNG.normal(size=(40, 21))), dim=-1)
    _, indices = torch.sort(probs, 1, True)
    for c in range(21):
        official = torch.sum(indices[:, 3:20].eq(c), dim=1).bool().numpy()
        np.testing.assert_array_equal(np.asarray(con.rank_mask(jnp.asarray(probs.numpy(), jnp.float32), 3, 20))[:, c],
                                      official)


# -- prototypes and the contrastive loss ----------------------------------------------------------
def test_prototypes_are_class_means_of_the_teacher_features():
    feats = RNG.normal(size=(30, 6)).astype(np.float32)
    members = RNG.random((30, 4)) < 0.4
    members[:, 3] = False
    got = np.asarray(con.prototypes(feats, members))
    for c in range(3):
        np.testing.assert_allclose(got[c], feats[members[:, c]].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[3], 0.0)


def test_info_nce_matches_torch_cosine_cross_entropy():
    anchors = RNG.normal(size=(8, 5))
    positive = RNG.normal(size=(5,))
    negatives = RNG.normal(size=(8, 3, 5))
    all_feat = torch.cat([torch.from_numpy(positive)[None, None].repeat(8, 1, 1), torch.from_numpy(negatives)], 1)
    logits = torch.cosine_similarity(torch.from_numpy(anchors).unsqueeze(1), all_feat, dim=2)
    want = F.cross_entropy(logits / 0.5, torch.zeros(8).long()).item()
    got = con.info_nce(jnp.asarray(anchors, jnp.float32), jnp.asarray(positive, jnp.float32),
                       jnp.asarray(negatives, jnp.float32), 0.5)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def reference_group_loss(rep, rep_t, probs, low, bank, anchor_idx, negative_idx, threshold, temp,
                         pairing="intended"):
    """The aggregation of `compute_contra_memobank_loss` in float64 torch, with the anchor and negative
    indices given (bank: list of (n_c, D) tensors, the filled part of each class queue).

    'reference': the official pairing (loss_helper.py lines 103-154 collect anchors and prototypes
    for every class index and list the present classes in `valid_classes`; lines 173-207 run slot
    i < |valid| with anchors and prototype of class i and the bank `memobank[valid_classes[i]]`;
    line 233 divides by |valid|), written from that description. 'intended': class c with bank c.
    Returns (loss, {slot: bank class} of the slots that were used)."""
    num_classes = low.shape[1]
    valid, protos, anchors_all = [], [], []
    for c in range(num_classes):
        low_c = low[:, c]
        anchors_all.append(rep[(probs[:, c] > threshold) & low_c])
        protos.append(torch.mean(rep_t[low_c], dim=0, keepdim=True))
        if low_c.sum() > 0:
            valid.append(c)
    if len(valid) <= 1:
        return 0.0, {}
    loss, used = torch.tensor(0.0, dtype=torch.float64), {}
    slots = dict(enumerate(valid)) if pairing == "reference" else {c: c for c in valid}
    for c, b in slots.items():
        if len(anchors_all[c]) == 0 or bank[b].shape[0] == 0:
            continue
        used[c] = b
        anchor = anchors_all[c][anchor_idx[c]]
        neg = bank[b][negative_idx[c]].reshape(anchor.shape[0], -1, rep.shape[1])
        feats = torch.cat([protos[c].unsqueeze(0).repeat(anchor.shape[0], 1, 1), neg], dim=1)
        logits = torch.cosine_similarity(anchor.unsqueeze(1), feats, dim=2)
        loss = loss + F.cross_entropy(logits / temp, torch.zeros(anchor.shape[0]).long())
    return (loss / len(valid)).item(), used


@pytest.mark.parametrize("pairing", ["intended", "reference"])
@pytest.mark.parametrize("case", ["all", "no_anchor", "empty_queue", "one_class", "absent_class"])
def test_group_loss_matches_the_reference_given_its_draws(case, pairing):
    n, d, c, q, k = 60, 6, 4, 16, 5
    caps = (20, 12, 12, 12)
    rep = RNG.normal(size=(n, d)).astype(np.float32)
    rep_t = RNG.normal(size=(n, d)).astype(np.float32)
    probs = np.array(jax.nn.softmax(jnp.asarray(2 * RNG.normal(size=(n, c)), jnp.float32)))
    label = RNG.integers(0, c, size=n)
    low = (label[:, None] == np.arange(c)) & (RNG.random((n, 1)) < 0.8)
    fill = np.array([20, 7, 12, 3])
    if case == "no_anchor":
        probs[:, 2] = np.minimum(probs[:, 2], 0.2)  # class 2 present, no pixel above 0.3
    if case == "empty_queue":
        fill[1] = 0
    if case == "one_class":
        low[:, 1:] = False
    if case == "absent_class":  # present {0, 2, 3}: the reference pairs slot 1 with bank 2, slot 2 with 3
        low[:, 1] = False
    bank = queue_lib.init_queue(caps, d)
    offs = queue_lib.offsets(caps)
    keys = RNG.normal(size=(sum(caps), d)).astype(np.float32)
    bank = {"keys": jnp.asarray(keys), "ptr": jnp.zeros(c, jnp.int32), "fill": jnp.asarray(fill, jnp.int32)}
    rng = jax.random.PRNGKey(3)
    got, present = con.group_loss(jnp.asarray(rep), jnp.asarray(rep_t), jnp.asarray(probs), jnp.asarray(low), bank,
                                  caps, rng, num_queries=q, num_negatives=k, temperature=0.5, threshold=0.3,
                                  pairing=pairing)

    # the same draws as group_loss: per slot fold_in(rng, slot) -> (anchor key, negative key), the
    # negatives' rows uniform over the filled part of the slot's bank
    present_classes = list(np.flatnonzero(low.any(0)))
    bank_of = (present_classes + [0] * c)[:c] if pairing == "reference" else list(range(c))
    anchor_idx, negative_idx = {}, {}
    for cls in range(c):
        key_a, key_n = jax.random.split(jax.random.fold_in(rng, cls))
        mask = low[:, cls] & (probs[:, cls] > 0.3)
        index = np.asarray(con.sample_masked(jnp.asarray(mask), q, key_a))
        anchor_idx[cls] = torch.from_numpy(np.searchsorted(np.flatnonzero(mask), index)) if mask.any() else None
        u = np.asarray(jax.random.uniform(key_n, (q * k,)))
        n_keys = fill[bank_of[cls]]
        negative_idx[cls] = torch.from_numpy(np.minimum(np.floor(u * n_keys).astype(np.int64), max(n_keys - 1, 0)))
    torch_bank = [torch.from_numpy(keys[offs[i]:offs[i] + fill[i]].astype(np.float64)) for i in range(c)]
    want, used = reference_group_loss(
        torch.from_numpy(rep.astype(np.float64)), torch.from_numpy(rep_t.astype(np.float64)),
        torch.from_numpy(probs.astype(np.float64)), torch.from_numpy(low), torch_bank, anchor_idx, negative_idx,
        0.3, 0.5, pairing)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
    if case == "absent_class":
        assert used == ({0: 0, 2: 3} if pairing == "reference" else {0: 0, 2: 2, 3: 3})
    assert float(present) == low.any(0).sum()
    if case == "one_class":
        assert float(got) == 0.0


def test_class_pairing_on_a_hand_computed_case():
    """Present {0, 2, 3}, one anchor pixel per class (its own prototype), one key per bank, T 0.5,
    1 negative: loss(a, k) = log(1 + exp((cos(a, k) - 1) / 0.5)). Intended: (l(a0, k0) + l(a2, k2)
    + l(a3, k3)) / 3. Reference: slot 0 = class 0 with bank 0, slot 1 (class 1: no anchor) = 0, slot 2
    = class 2 with bank v_2 = 3, slot 3 >= P unused: (l(a0, k0) + l(a2, k3)) / 3."""
    s = 1 / np.sqrt(2)
    feats = np.array([[1, 0], [0, 1], [s, s], [1, 0]], np.float32)  # pixels of classes 0, 2, 3, none
    low = np.zeros((4, 4), bool)
    low[0, 0] = low[1, 2] = low[2, 3] = True
    probs = np.full((4, 4), 0.1, np.float32)
    probs[0, 0] = probs[1, 2] = probs[2, 3] = 0.7
    keys = np.array([[0, 1], [1, 1], [1, 0], [0, 1]], np.float32)  # bank c holds key k_c
    bank = {"keys": jnp.asarray(keys), "ptr": jnp.ones(4, jnp.int32), "fill": jnp.ones(4, jnp.int32)}

    def loss(pairing):
        return float(con.group_loss(jnp.asarray(feats), jnp.asarray(feats), jnp.asarray(probs), jnp.asarray(low),
                                    bank, (1, 1, 1, 1), jax.random.PRNGKey(0), num_queries=3, num_negatives=1,
                                    temperature=0.5, threshold=0.3, pairing=pairing)[0])

    def pair(cos_ak):
        return np.log1p(np.exp((cos_ak - 1) / 0.5))

    # cos(a0, k0) = 0, cos(a2, k2) = 0, cos(a3, k3) = 1/sqrt(2), cos(a2, k3) = 1
    np.testing.assert_allclose(loss("intended"), (pair(0) + pair(0) + pair(s)) / 3, rtol=1e-6)
    np.testing.assert_allclose(loss("reference"), (pair(0) + pair(1)) / 3, rtol=1e-6)


def test_group_loss_gradient_reaches_only_the_anchors():
    n, d, c = 40, 4, 3
    rep = jnp.asarray(RNG.normal(size=(n, d)), jnp.float32)
    probs = jnp.full((n, c), 1.0 / c).at[:, 0].set(0.5).at[:, 1].set(0.4).at[:, 2].set(0.1)
    low = jnp.asarray(RNG.random((n, c)) < 0.5)
    bank = {"keys": jnp.asarray(RNG.normal(size=(30, d)), jnp.float32), "ptr": jnp.zeros(c, jnp.int32),
            "fill": jnp.full((c,), 10, jnp.int32)}

    def loss(rep, rep_t):
        return con.group_loss(rep, rep_t, probs, low, bank, (10, 10, 10), jax.random.PRNGKey(0), num_queries=8,
                              num_negatives=2, temperature=0.5, threshold=0.3)[0]

    g_rep, g_rep_t = jax.grad(loss, argnums=(0, 1))(rep, rep + 1.0)
    assert float(jnp.abs(g_rep).sum()) > 0
    assert float(jnp.abs(g_rep_t).sum()) == 0.0
    # only pixels of a class above the anchor threshold (classes 0 and 1) receive gradient
    anchor_rows = np.asarray(low[:, 0] | low[:, 1])
    assert np.all(np.asarray(jnp.abs(g_rep).sum(1))[~anchor_rows] == 0)


# -- the memory bank ---------------------------------------------------------------------------
def reference_ring(capacities, writes):
    """Sequential ring writes (one key at a time) and the official concatenate-and-keep-the-tail sets."""
    rings = [np.zeros((cap, writes[0][0][0].shape[-1])) for cap in capacities]
    ptr, fill = [0] * len(capacities), [0] * len(capacities)
    official = [np.zeros((0, writes[0][0][0].shape[-1])) for _ in capacities]
    for groups in writes:
        for group in groups:  # global group order
            for c, keys in enumerate(group):
                for key in keys:
                    rings[c][ptr[c]] = key
                    ptr[c] = (ptr[c] + 1) % capacities[c]
                    fill[c] = min(fill[c] + 1, capacities[c])
                official[c] = np.concatenate([official[c], keys])[-capacities[c]:]
    return rings, ptr, fill, official


def test_queue_write_order_and_wrap_around():
    caps, d, k = (7, 5), 3, 4
    bank = queue_lib.init_queue(caps, d)
    writes = []
    for step in range(4):
        counts = RNG.integers(0, k + 1, size=(3, 2))
        counts[1, 0] = k if step == 2 else counts[1, 0]
        keys = RNG.normal(size=(3, 2, k, d)).astype(np.float32)
        bank = queue_lib.write(bank, jnp.asarray(keys), jnp.asarray(counts, jnp.int32), caps)
        writes.append([[keys[g, c, :counts[g, c]] for c in range(2)] for g in range(3)])
    rings, ptr, fill, official = reference_ring(caps, writes)
    offs = queue_lib.offsets(caps)
    for c in range(2):
        rows = np.asarray(bank["keys"])[offs[c]:offs[c] + caps[c]]
        np.testing.assert_array_equal(rows, rings[c].astype(np.float32))
        filled = {tuple(r) for r in rows[:fill[c]]} if fill[c] < caps[c] else {tuple(r) for r in rows}
        assert filled == {tuple(r) for r in official[c].astype(np.float32)}  # the set U2PL keeps
    np.testing.assert_array_equal(np.asarray(bank["ptr"]), ptr)
    np.testing.assert_array_equal(np.asarray(bank["fill"]), fill)


def test_queue_write_of_more_keys_than_capacity_keeps_the_last_ones():
    caps, d = (3,), 1
    keys = np.arange(2 * 1 * 4, dtype=np.float32).reshape(2, 1, 4, 1)  # 8 keys 0..7 in order
    bank = queue_lib.write(queue_lib.init_queue(caps, d), jnp.asarray(keys), jnp.full((2, 1), 4, jnp.int32), caps)
    rings, ptr, fill, official = reference_ring(caps, [[[keys[g, 0]] for g in range(2)]])
    np.testing.assert_array_equal(np.asarray(bank["keys"])[:, 0], rings[0][:, 0])
    assert sorted(np.asarray(bank["keys"])[:, 0]) == [5.0, 6.0, 7.0] == sorted(official[0][:, 0])
    assert int(bank["ptr"][0]) == ptr[0] == 8 % 3 and int(bank["fill"][0]) == 3


def test_write_candidates_is_the_official_concatenate_and_keep_the_tail():
    """'newest': every candidate, in pixel order, appended per class; the class keeps its last cap_c keys
    (`dequeue_and_enqueue`, u2pl/utils/utils.py lines 28-47: cat, then keep [-queue_size:]). Four
    steps with a wrap-around and a step of more keys than a capacity; the ring rows equal
    one-key-at-a-time ring writes, the filled set equals the official queue, ptr and fill as the ring."""
    caps, d, m = (9, 6, 5), 2, 12
    rng = np.random.default_rng(5)
    bank = queue_lib.init_queue(caps, d)
    writes = []
    for step in range(4):
        cand = rng.random((m, 3)) < (0.9 if step == 2 else 0.3)
        feats = rng.normal(size=(m, d)).astype(np.float32)
        bank = queue_lib.write_candidates(bank, jnp.asarray(cand), jnp.asarray(feats), caps)
        writes.append([[feats[cand[:, c]] for c in range(3)]])  # one sequence per class, pixel order
    rings, ptr, fill, official = reference_ring(caps, writes)
    offs = queue_lib.offsets(caps)
    for c in range(3):
        rows = np.asarray(bank["keys"])[offs[c]:offs[c] + caps[c]]
        np.testing.assert_array_equal(rows, rings[c].astype(np.float32))
        assert {tuple(r) for r in rows[:fill[c]]} == {tuple(r) for r in official[c].astype(np.float32)}
    np.testing.assert_array_equal(np.asarray(bank["ptr"]), ptr)
    np.testing.assert_array_equal(np.asarray(bank["fill"]), fill)
    assert max(len(w[0][1]) for w in writes) > caps[1]  # a step wrote more keys than class 1 holds


def test_select_keys_takes_distinct_candidates_up_to_the_limit():
    cand = RNG.random((50, 3)) < 0.3
    cand[:, 2] = False
    feats = np.arange(50, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    keys, count = queue_lib.select_keys(jnp.asarray(cand), jnp.asarray(feats), 6, jax.random.PRNGKey(1), (6, 4, 6))
    np.testing.assert_array_equal(np.asarray(count), np.minimum(cand.sum(0), (6, 4, 6)))
    for c in range(2):
        rows = np.asarray(keys)[c, :int(count[c]), 0].astype(int)
        assert len(set(rows)) == len(rows) and cand[rows, c].all()


# -- static-shape sampling vs the reference's uniform draws ------------------------------------------
def chi_square_p(counts, expected):
    from scipy import stats

    return stats.chisquare(counts, expected).pvalue


def test_sample_masked_is_uniform_over_the_mask():
    mask = np.zeros(200, bool)
    mask[RNG.choice(200, 37, replace=False)] = True
    draws = np.concatenate([np.asarray(con.sample_masked(jnp.asarray(mask), 4096, jax.random.PRNGKey(s)))
                            for s in range(20)])
    assert mask[draws].all()  # torch.randint(len(candidates)) only ever picks candidates
    counts = np.bincount(draws, minlength=200)[mask]
    assert chi_square_p(counts, np.full(37, len(draws) / 37)) > 1e-3


def test_queue_sample_is_uniform_over_the_filled_rows():
    caps = (10, 40)
    bank = {"keys": jnp.arange(50, dtype=jnp.float32)[:, None], "ptr": jnp.zeros(2, jnp.int32),
            "fill": jnp.asarray([10, 23], jnp.int32)}
    draws = np.concatenate([np.asarray(queue_lib.sample(bank, jnp.int32(1), 5000, jax.random.PRNGKey(s), caps))[:, 0]
                            for s in range(10)]).astype(int)
    assert draws.min() >= 10 and draws.max() < 33
    assert chi_square_p(np.bincount(draws - 10, minlength=23), np.full(23, len(draws) / 23)) > 1e-3


def test_select_keys_is_a_uniform_subset():
    cand = np.zeros((30, 1), bool)
    cand[::2] = True  # 15 candidates, keep 5: each with probability 1/3
    feats = np.arange(30, dtype=np.float32)[:, None]
    trials = 3000
    keys, count = jax.vmap(lambda key: queue_lib.select_keys(jnp.asarray(cand), jnp.asarray(feats), 5, key, (5,)))(
        jax.random.split(jax.random.PRNGKey(0), trials))
    assert (np.asarray(count) == 5).all()
    hits = np.bincount(np.asarray(keys)[:, 0, :, 0].astype(int).ravel(), minlength=30)
    assert hits[1::2].sum() == 0
    assert chi_square_p(hits[::2], np.full(15, trials * 5 / 15)) > 1e-3


def test_info_nce_gradient_matches_torch_also_for_a_zero_anchor():
    anchors = RNG.normal(size=(4, 5))
    anchors[1] = 0.0  # ReLU-zero features with zero bias: torch's eps clamp, no NaN
    positive, negatives = RNG.normal(size=(5,)), RNG.normal(size=(4, 3, 5))
    a = torch.from_numpy(anchors).requires_grad_()
    keys = torch.cat([torch.from_numpy(positive)[None, None].repeat(4, 1, 1), torch.from_numpy(negatives)], 1)
    F.cross_entropy(torch.cosine_similarity(a.unsqueeze(1), keys, dim=2) / 0.5, torch.zeros(4).long()).backward()
    got = jax.grad(lambda x: con.info_nce(x, jnp.asarray(positive, jnp.float32), jnp.asarray(negatives, jnp.float32),
                                          0.5))(jnp.asarray(anchors, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), a.grad.numpy(), rtol=1e-4, atol=1e-5)
