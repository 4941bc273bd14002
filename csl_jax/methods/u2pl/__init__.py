"""U2PL: Using Unreliable Pseudo-Labels (CVPR 2022), docs/methods/u2pl.md.

One step, per device, in loss groups of g labeled + g unlabeled images (`config.loss.group_size`):

- epochs < E0 (`sup_only_epochs`): the student trains on the labeled batch alone; the teacher
  runs a train-mode pass on it (its BN statistics only).
- afterwards:
  1. pseudo-labels yhat = argmax of the eval-mode teacher on u (crop resolution);
  2. in-batch CutMix (one coin per step, p = `cutmix_prob`): inside its box, image i takes the
     pixels of image (i+1) mod g of its group; yhat and the padding map follow;
  3. student train pass on [x; u~] (pred and rep at stride 4, logits upsampled);
  4. teacher train pass on [x; u~] without gradient (its BN statistics move): P_T, r_T at
     stride 4, H = entropy of its upsampled softmax on u~;
  5. L = L_sup + L_u + contrastive_weight * L_c (u2pl/unsup.py, u2pl/contrastive.py); the keys of the
     high-entropy pixels of every group are written into the class-wise bank (u2pl/queue.py) in
     global group order before the negatives are drawn.
- teacher params (`after_update`, i = the step just done, L steps per epoch): unchanged while
  i < L E0 - 1, the student's copy while i < L (E0 + 1), then EMA with
  d = min(1 - 1/(i - L E0 + 1), ema_momentum). Its BN statistics are only its own.

Predict functions: 'model' (the student up to epoch E0, the teacher after: what U2PL validates
and selects checkpoints with), 'teacher', 'student'.

Variants (`VARIANTS`, docs/methods/u2pl.md "Variants"): 'reference' (the defaults) runs the official
code as it produced the published numbers: its one-hot bug and the one-hot gate on the keys, its
class/bank pairing of the contrastive loss (issue #111), every key written and the newest kept, crop
padding labelled 0. 'intended' runs the method of the paper: per-sample one-hot, class c
contrasted with bank c, a random capped subset of keys per group, padding ignored.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import StreamSpec
from csl_jax.data.pipeline import REPEATS
from csl_jax.methods.base import (Method, StepContext, above, at_least, check_fields, check_network, check_ranges,
                                  init_network, whole_at_least, with_later_fields, within)
from csl_jax.methods.parts import passes, resize
from csl_jax.methods.u2pl import contrastive as u2pl_contrastive
from csl_jax.methods.u2pl import data as u2pl_data  # noqa: F401  (registers the 'u2pl' geometry and 'u2pl_box' view)
from csl_jax.methods.u2pl import queue as u2pl_queue
from csl_jax.methods.u2pl import unsup as u2pl_unsup
from csl_jax.models.layers import resize_align_corners
from csl_jax.parallel import AXIS

NAME = "u2pl"


def default_options() -> ml_collections.ConfigDict:
    """`config.method` of U2PL as its official code runs (experiments/*/ours/config.yaml, train_semi.py, the
    'reference' variant; `VARIANTS['intended']` lists what the corrected method changes).

    sup_only_epochs E0 (Pascal 1, the code default; Cityscapes 0); ema_momentum; drop_percent (80:
    q_0 = 20 %); low_entropy_threshold (alpha_0 = 20 %); low_rank / high_rank (3 / 20);
    current_class_threshold (0.3); current_class_negative_threshold (1); num_queries (256);
    num_negatives (50); temperature (0.5); queue_capacity (30000) and queue_capacity_class0
    (50000); queue_write ('newest': every key written in order, the newest capacity_c kept, as
    the reference; 'random_capped': at most max_keys_per_group random keys per group and class);
    max_keys_per_group ('random_capped' only; 0 = ceil(capacity_c / global groups));
    contrastive_weight (the reference's effective 1/W: 0.25 Pascal, 0.125 Cityscapes); unsup_weight
    (1); aux_weight (0.4, used when model.aux); cutmix_prob (0.5); reference_onehot (True: the
    official one-hot bug and its gate on the keys); class_pairing ('reference': the official slot /
    bank pairing of L_c; 'intended': class c with bank c); labeled_negatives (the paper's labeled
    negatives, off as in the code); pad_label (0: the reference's, labeled padding is background
    and unlabeled padding gets pseudo-labels and counts everywhere; 255: crop padding is ignored);
    labeled_repeat (how the labeled list is repeated to |U| entries, `StreamSpec.repeat`: 'sample',
    the reference's `random.sample` once per seed; 'tile' before it existed).
    """
    o = ml_collections.ConfigDict()
    o.name = NAME
    o.sup_only_epochs = 1
    o.ema_momentum = 0.99
    o.drop_percent = 80.0
    o.low_entropy_threshold = 20.0
    o.low_rank = 3
    o.high_rank = 20
    o.current_class_threshold = 0.3
    o.current_class_negative_threshold = 1.0
    o.num_queries = 256
    o.num_negatives = 50
    o.temperature = 0.5
    o.queue_capacity = 30000
    o.queue_capacity_class0 = 50000
    o.queue_write = "newest"
    o.max_keys_per_group = 0
    o.contrastive_weight = 0.25
    o.unsup_weight = 1.0
    o.aux_weight = 0.4
    o.cutmix_prob = 0.5
    o.reference_onehot = True
    o.class_pairing = "reference"
    o.labeled_negatives = False
    o.pad_label = 0
    o.labeled_repeat = "sample"
    return o


#: `:SPLIT,VARIANT` of the U2PL configs -> config.method overrides of `default_options()`.
VARIANTS = {"reference": {},
            "intended": dict(reference_onehot=False, class_pairing="intended", queue_write="random_capped",
                             pad_label=IGNORE_INDEX)}
#: fields added after U2PL's first release, with the values older saved configs meant.
LATER_FIELDS = {"pad_label": IGNORE_INDEX, "class_pairing": "intended", "queue_write": "random_capped",
                "labeled_repeat": "tile"}
_CHOICES = {"class_pairing": ("reference", "intended"), "queue_write": ("newest", "random_capped"),
            "labeled_repeat": REPEATS}


def configure(c: ml_collections.ConfigDict, variant: str = "reference") -> ml_collections.ConfigDict:
    """Makes config `c` a U2PL config: `default_options()` with the `VARIANTS[variant]` overrides as
    `c.method` (`method.variant` 'u2pl' or 'u2pl_<variant>' names the report's row), the 'u2pl'
    network with U2PL's backbone settings (ceil-mode max-pool, multi-grid) and a 256-d
    representation head; the widths, output stride and ASPP rates stay `c`'s. Returns `c`."""
    if variant not in VARIANTS:
        raise ValueError(f"U2PL variant {variant!r}; valid: {sorted(VARIANTS)}")
    c.method = default_options()
    c.method.update(VARIANTS[variant])
    c.method.variant = NAME if variant == "reference" else f"{NAME}_{variant}"
    c.model.name = NAME
    c.model.maxpool_ceil = True
    c.model.multi_grid = True
    c.model.rep_dim = 256
    c.model.aux = False
    return c


def option_ranges(opts: ml_collections.ConfigDict) -> dict:
    """The valid values of the numeric `config.method` fields: key -> Range (csl_jax.methods.base)."""
    return {"num_queries": above(0), "num_negatives": above(0), "queue_capacity": above(0),
            "queue_capacity_class0": above(0), "temperature": above(0),
            "sup_only_epochs": whole_at_least(0),
            "ema_momentum": within(0.0, 1.0, high_open=True),
            "drop_percent": within(0.0, 100.0),
            "low_entropy_threshold": within(0.0, 100.0),
            "high_rank": whole_at_least(1),
            "low_rank": (lambda v: whole_at_least(0)[0](v) and v < opts.high_rank, "an int in [0, high_rank)"),
            "max_keys_per_group": (whole_at_least(0)[0], "an int >= 0 (0 = ceil(capacity / groups))"),
            "cutmix_prob": within(0.0, 1.0),
            "contrastive_weight": at_least(0), "unsup_weight": at_least(0),
            "pad_label": (lambda v: v in (0, IGNORE_INDEX), f"0 (the reference) or {IGNORE_INDEX} (padding ignored)")}


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing or invalid."""
    opts = with_later_fields(opts, LATER_FIELDS)
    check_fields(opts, default_options(), "u2pl", _CHOICES)
    check_ranges(opts, option_ranges(opts))


def _tree_where(flag: jax.Array, a, b):
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


class U2PL(Method):
    """U2PL (module docstring). State: {'batch_stats', 'teacher': {'params', 'batch_stats'}, 'queue':
    {'keys', 'ptr', 'fill'}, 'steps_per_epoch': int32 (written by the loss)}."""

    epoch_stream = "unlabeled"
    best_predict = "model"
    later_fields = LATER_FIELDS

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        check_options(config.method)
        check_network(config, NAME, paired_batches=True)
        super().__init__(config, num_classes)
        self.opts = with_later_fields(config.method, LATER_FIELDS)
        self.group_size = int(config.loss.group_size)
        self.capacities = (int(self.opts.queue_capacity_class0),) + (int(self.opts.queue_capacity),) * (num_classes - 1)
        groups = max(1, config.batch.unlabeled // self.group_size)
        k = int(self.opts.max_keys_per_group)
        self.key_limits = tuple(k if k else math.ceil(cap / groups) for cap in self.capacities)
        self.rep_dim = int(config.model.get("rep_dim", 256))
        self.aux = bool(config.model.get("aux", False))

    # -- networks, state, streams ----------------------------------------------------------------
    def init(self, rng, image_shape):
        """Student and teacher (each its own random decoder, the same `init_from`; the teacher is the
        student's copy when E0 = 0), an empty bank. Without pretrained weights each residual
        branch's last BN starts at scale 0 (`zero_init_residual: True`)."""
        keys = jax.random.split(rng)
        nets = [init_network(self.model, self.config.model, k, image_shape) for k in keys]
        if self.config.model.get("init_from", "none") in ("", "none"):
            nets = [_zero_init_residual(n) for n in nets]
        student, teacher = nets
        if self.opts.sup_only_epochs == 0:
            teacher = student
        teacher = {"params": teacher["params"], "batch_stats": teacher["batch_stats"]}
        state = {"batch_stats": student["batch_stats"], "teacher": jax.tree.map(jnp.array, teacher),
                 "queue": u2pl_queue.init_queue(self.capacities, self.rep_dim),
                 "steps_per_epoch": jnp.zeros((), jnp.int32)}
        return student["params"], state

    def streams(self):
        geometry = "u2pl" if self.opts.pad_label == IGNORE_INDEX else "u2pl_pad0"
        return {"labeled": StreamSpec(source="labeled", batch="labeled", epoch_of="unlabeled",
                                      repeat=self.opts.labeled_repeat, geometry=geometry),
                "unlabeled": StreamSpec(source="unlabeled", batch="unlabeled", views=("u2pl_box",),
                                        geometry=geometry)}

    def after_update(self, state, params, step):
        """Teacher params: kept, copied from the student or EMA (module docstring); BN statistics untouched."""
        e0 = self.opts.sup_only_epochs
        length = state["steps_per_epoch"]
        i = step.astype(jnp.int32)
        since = (i - length * e0 + 1).astype(jnp.float32)
        decay = jnp.minimum(1.0 - 1.0 / jnp.maximum(since, 1.0), jnp.float32(self.opts.ema_momentum))
        teacher = state["teacher"]["params"]
        ema = jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, teacher, params)
        new = _tree_where(i < length * e0 - 1, teacher, _tree_where(i < length * (e0 + 1), params, ema))
        return dict(state, teacher=dict(state["teacher"], params=new))

    # -- evaluation ------------------------------------------------------------------------------
    def predict_fns(self):
        return {"model": self._predict, "teacher": self._predict, "student": self._predict}

    def eval_variables(self, train_state, name):
        """'student', 'teacher', or 'model': the student while steps done <= L E0, else the teacher."""
        self._check_predict_name(name)
        student = {"params": train_state.params, "batch_stats": train_state.state["batch_stats"]}
        teacher = train_state.state["teacher"]
        if name != "model":
            return student if name == "student" else teacher
        before = train_state.step <= train_state.state["steps_per_epoch"] * self.opts.sup_only_epochs
        return _tree_where(before, student, teacher)

    # -- loss ------------------------------------------------------------------------------------
    def _supervised(self, logits, out, labels):
        """L_sup on the labeled images: CE / OHEM (config.loss.labeled), plus aux_weight x the same on the aux head."""
        loss = self.labeled_loss(logits, labels)
        if self.aux:
            aux = resize_align_corners(out["aux"][: labels.shape[0]], labels.shape[1:3])
            loss = loss + self.opts.aux_weight * self.labeled_loss(aux, labels)
        return loss

    def loss(self, params, state, batch, ctx: StepContext):
        """One U2PL step (module docstring); in epochs < E0 the supervised-only step, computed by the same
        passes: the second half of both networks' train passes sees x again instead of u~, with x's dropout
        masks (so every BN normalises with the statistics of x alone, and L_sup and its gradient are those
        of x alone; the running variances take 2N/(2N-1) instead of N/(N-1)), and
        L = L_sup, the bank, the unlabeled losses and their metrics are masked out with `where` (no
        `lax.cond`, whose branches XLA:CPU runs an order of magnitude slower)."""
        o, g = self.opts, self.group_size
        lab, unl = batch["labeled"], batch["unlabeled"]
        n = lab["image"].shape[0]
        if unl["weak"].shape[0] != n or n % g:
            raise ValueError(f"U2PL needs equal local labeled/unlabeled batches divisible by config.loss.group_size="
                             f"{g}; got {n} labeled and {unl['weak'].shape[0]} unlabeled")
        state = dict(state, steps_per_epoch=jnp.asarray(ctx.steps_per_epoch, jnp.int32))
        rng_s, rng_t, rng_mix, rng_keys, rng_con = jax.random.split(ctx.rng, 5)
        ids_l, ids_u = ctx.sample_ids("labeled", n), ctx.sample_ids("unlabeled", n)
        teacher = jax.lax.stop_gradient(state["teacher"])
        sup_phase = ctx.step < ctx.steps_per_epoch * o.sup_only_epochs
        epoch = ctx.step // ctx.steps_per_epoch
        epochs = self.schedule_epochs(ctx.steps_per_epoch)

        # 1-2. pseudo-labels (eval-mode teacher, before mixing), in-batch CutMix
        t_logits = passes.eval_pass(self.model, teacher, unl["weak"])
        pseudo = jnp.argmax(t_logits, axis=-1).astype(jnp.int32)
        coin = jax.random.uniform(rng_mix) < o.cutmix_prob
        box = unl["u2pl_box"] & coin
        mixed = {"image": unl["weak"], "pseudo": pseudo, "ignore": unl["ignore"], "label": unl["label"]}
        mixed = jax.tree.map(lambda x: jnp.where(_expand(box, x), _partner(x, g), x), mixed)
        if o.pad_label == 0:  # the reference: unlabeled padding is an image region like any other
            mixed["ignore"] = jnp.zeros_like(mixed["ignore"])
        valid_u = mixed["ignore"] != IGNORE_INDEX

        # 3. student, 4. teacher (train mode, no gradient; its statistics move); x twice in epochs < E0
        images = jnp.concatenate([lab["image"], jnp.where(sup_phase, lab["image"], mixed["image"])])
        ids = jnp.concatenate([ids_l, jnp.where(sup_phase, ids_l, ids_u)])  # x twice: the same dropout masks
        (logits, out), stats = passes.train_pass(self.model, params, state["batch_stats"], images, rng=rng_s,
                                                 sample_ids=ids)
        (t_logits_mix, t_out), t_stats = passes.train_pass(self.model, teacher["params"], teacher["batch_stats"],
                                                           images, rng=rng_t, sample_ids=ids)
        t_logits_mix, t_out = jax.lax.stop_gradient((t_logits_mix, t_out))
        entropies = u2pl_unsup.entropy(jax.nn.softmax(t_logits_mix[n:], axis=-1))
        probs_t = jax.nn.softmax(t_out["pred"], axis=-1)

        # 5. losses
        loss_sup = self._supervised(logits[:n], out, lab["label"])
        percent = u2pl_unsup.drop_percentile(epoch, epochs, o.drop_percent)
        loss_u, kept = u2pl_unsup.unsupervised_loss(logits[n:], mixed["pseudo"], valid_u, entropies, percent,
                                                    group_size=g)
        alpha = o.low_entropy_threshold * (1.0 - epoch.astype(jnp.float32) / epochs)
        low_thr = u2pl_unsup.group_percentile(entropies, valid_u, alpha, g)
        high_thr = u2pl_unsup.group_percentile(entropies, valid_u, 100.0 - alpha, g)
        small = out["pred"].shape[1:3]
        low_u = downsample(valid_u & (entropies <= low_thr), small)
        high_u = downsample(valid_u & (entropies >= high_thr), small)
        label_l = downsample(lab["label"], small)
        pseudo_u = downsample(mixed["pseudo"], small)
        group_inputs = self._group_inputs(out["rep"], t_out["rep"], probs_t, label_l, pseudo_u, low_u, high_u)

        # keys of all devices' groups in global group order into the bank; then the losses
        first_group = jax.lax.axis_index(AXIS) * (n // g)
        group_ids = first_group + jnp.arange(n // g)
        queue = self._write_keys(state["queue"], group_inputs, group_ids, rng_keys)
        group_losses, present = jax.vmap(lambda rep, rep_t, probs, low, gid: u2pl_contrastive.group_loss(
            rep, rep_t, probs, low, queue, self.capacities, jax.random.fold_in(rng_con, gid),
            num_queries=o.num_queries, num_negatives=o.num_negatives, temperature=o.temperature,
            threshold=o.current_class_threshold, pairing=o.class_pairing))(
            group_inputs["rep"], group_inputs["rep_t"], group_inputs["probs"], group_inputs["low"], group_ids)
        loss_c = jnp.mean(group_losses)
        loss = jnp.where(sup_phase, loss_sup, loss_sup + o.unsup_weight * loss_u + o.contrastive_weight * loss_c)

        queue = _tree_where(sup_phase, state["queue"], queue)
        new_state = dict(state, batch_stats=stats, queue=queue, teacher=dict(state["teacher"], batch_stats=t_stats))
        # 'mask_ratio': share of the valid unlabeled pixels L_u keeps; accuracies of the (mixed)
        # pseudo-labels against the unlabeled ground truth where the dataset has it
        unlabeled = {"loss_u": loss_u, "loss_c": loss_c, "present_classes": jnp.mean(present),
                     "cutmix": coin.astype(jnp.float32),
                     **passes.pseudo_label_metrics(mixed["pseudo"], kept.astype(jnp.float32), kept, mixed["ignore"],
                                                   mixed["label"], axis_name=AXIS)}
        metrics = {"loss": loss, "loss_sup": loss_sup, "queue_fill": _queue_fill(queue, self.capacities),
                   **jax.tree.map(lambda m: jnp.where(sup_phase, 0.0, m), unlabeled)}
        return loss, (new_state, metrics)

    def _write_keys(self, queue, group_inputs, group_ids, rng):
        """The bank after this step's keys (`config.method.queue_write`, u2pl_queue), the same on every device.

        'newest' gathers every group's candidate masks (G, N', C) and teacher features (G, N', D),
        N' the unlabeled pixels only when labeled pixels give no keys, and writes them all in
        order; 'random_capped' gathers each group's random subset (`select_keys`).
        """
        if self.opts.queue_write == "newest":
            first = 0 if self._labeled_keys() else group_inputs["candidates"].shape[1] // 2
            cand, feats = (jax.lax.all_gather(group_inputs[k][:, first:], AXIS, tiled=True)
                           for k in ("candidates", "rep_t"))
            return u2pl_queue.write_candidates(queue, cand.reshape(-1, cand.shape[-1]),
                                               feats.reshape(-1, feats.shape[-1]), self.capacities)
        keys, counts = jax.vmap(lambda cand, feats, gid: u2pl_queue.select_keys(
            cand, feats, max(self.key_limits), jax.random.fold_in(rng, gid), self.key_limits))(
            group_inputs["candidates"], group_inputs["rep_t"], group_ids)
        keys = jax.lax.all_gather(keys, AXIS, tiled=True)
        counts = jax.lax.all_gather(counts, AXIS, tiled=True)
        return u2pl_queue.write(queue, keys, counts, self.capacities)

    def _labeled_keys(self) -> bool:
        """Whether labeled pixels can be keys: the paper's labeled rule, never with the reference one-hot."""
        return bool(self.opts.labeled_negatives and not self.opts.reference_onehot)

    def _group_inputs(self, rep, rep_t, probs_t, label_l, pseudo_u, low_u, high_u):
        """Per-group (G, N, ...) arrays of the contrastive loss, N = 2 g h w pixels, labeled first.

        rep, rep_t: (2B, h, w, D) student / teacher features; probs_t: (2B, h, w, C); label_l,
        pseudo_u: (B, h, w) int32 at stride 4; low_u, high_u: (B, h, w) bool entropy masks.
        Returns {'rep', 'rep_t' (G, N, D), 'probs' (G, N, C), 'low', 'candidates' (G, N, C) bool}.
        """
        o, g, c = self.opts, self.group_size, self.num_classes
        b = label_l.shape[0]

        def by_group(x_l, x_u):  # (B, h, w, ...) pair -> (G, 2 g h w, ...)
            shape = x_l.shape[3:]
            x_l = x_l.reshape((b // g, -1) + shape)
            x_u = x_u.reshape((b // g, -1) + shape)
            return jnp.concatenate([x_l, x_u], axis=1)

        onehot = jax.vmap(lambda y: u2pl_contrastive.one_hot(y, c, o.reference_onehot))
        oh_l = onehot(label_l.reshape((b // g, g) + label_l.shape[1:])).reshape(label_l.shape + (c,))
        oh_u = onehot(pseudo_u.reshape((b // g, g) + pseudo_u.shape[1:])).reshape(pseudo_u.shape + (c,))
        valid_l = label_l != IGNORE_INDEX
        low = by_group(oh_l & valid_l[..., None], oh_u & low_u[..., None])
        probs = by_group(probs_t[:b], probs_t[b:])
        p_l, p_u = probs_t[:b].reshape(-1, c), probs_t[b:].reshape(-1, c)
        cand_u = u2pl_contrastive.negative_candidates(
            p_u, high_u.reshape(-1), low_rank=o.low_rank, high_rank=o.high_rank,
            negative_threshold=o.current_class_negative_threshold,
            gate=oh_u.reshape(-1, c) if o.reference_onehot else None).reshape(oh_u.shape)
        if self._labeled_keys():
            cand_l = u2pl_contrastive.labeled_negative_candidates(
                p_l, oh_l.reshape(-1, c), valid_l.reshape(-1), low_rank=o.low_rank,
                negative_threshold=o.current_class_negative_threshold).reshape(oh_l.shape)
        else:
            cand_l = jnp.zeros_like(oh_l)
        return {"rep": by_group(rep[:b], rep[b:]), "rep_t": by_group(rep_t[:b], rep_t[b:]), "probs": probs,
                "low": low, "candidates": by_group(cand_l, cand_u)}


def downsample(x, size):
    """Legacy-nearest downsampling of (B, H, W) masks / labels to the stride-4 grid."""
    return resize.downsample_nearest(x, size)


def _expand(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def _partner(x, group_size):
    """x[(i + 1) mod g] within each group of `group_size` consecutive images."""
    groups = x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])
    return jnp.roll(groups, -1, axis=1).reshape(x.shape)


def _queue_fill(queue, capacities):
    """Mean over classes of fill_c / capacity_c, float32."""
    return jnp.mean(queue["fill"].astype(jnp.float32) / jnp.asarray(capacities, jnp.float32))


def _zero_init_residual(variables):
    """Sets the scale of every bottleneck's last BN (`bn3`) in the backbone to 0 (torchvision zero_init_residual)."""
    def visit(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        return jnp.zeros_like(leaf) if names[:2] == ["params", "backbone"] and names[-2:] == ["bn3", "scale"] else leaf

    return jax.tree_util.tree_map_with_path(visit, variables)

