"""CSS: Collaborative Space Supervision ("Space Engage", ICCV 2023), docs/methods/css.md.

The official `cross_label.py` + `Model_cross`. One step, per device, in loss groups of g labeled
and g unlabeled images (`config.loss.group_size`, the reference per-GPU batch):

1. teacher, train-mode BN, no gradient: a pass on x (its statistics only), then on u (the weak
   crop): z_T, r_T at stride 4;
2. targets at crop resolution: y_cls, c_cls = argmax / max softmax(up(z_T)); y_rep, c_rep from
   softmax(up(cos(r_T, P)) / rep_temp) with the prototypes P before this step's update
   (css_targets.teacher_targets); carried through the host's step-2 warp ('warp_index'), the
   in-group CutMix (partner (i+1) mod g) and the flip, like the strong image;
3. student, train mode, two passes (x, then u~; both move its statistics);
4. q = softmax(cos(r_S, P) / rep_temp) at stride 4; prototypes: P_c <- the global mean of the
   student's detached features of class c (labeled: ground truth; unlabeled: y_cls with
   c_cls >= weak_threshold; labels at stride 4, nearest), or 0.99 P_c + 0.01 mean once set, for
   every class present in the global batch, identically on every device (css_losses);
5. L = L_sup + L_u + lambda(e) L_c with L_u = attention-threshold CE on (y_rep, c_rep) (y_cls,
   c_cls in the first `warmup_epochs`), L_c = the prototype contrastive loss per group with the
   updated prototypes, lambda(e) = exp(-5 (e / 200)^2) (0 from e = 200), e = labeled epochs
   (`rampdown_unit='labeled_epochs'`, the reference: floor(step / steps per labeled epoch)) or
   200 t / T ('run': the ramp-down spans the run).
After the optimiser step the teacher's params (not its statistics) become d T + (1 - d) S,
d = min(1 - 1/(t + 1), ema_momentum), t = steps done before it (`after_update`).

Predict functions: 'teacher' (eval-mode EMA teacher, what CSS evaluates; picks the best
checkpoint) and 'student'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.config_checks import is_number
from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import StreamSpec
from csl_jax.methods.base import (BOOLEAN, StepContext, TeacherStudentMethod, above, at_least, check_fields,
                                  check_network, check_ranges, init_network, whole_at_least, within)
from csl_jax.methods.css import data as css_data
from csl_jax.methods.css import losses as css_losses
from csl_jax.methods.css import targets as css_targets
from csl_jax.methods.parts import passes, resize, teacher
from csl_jax.parallel import AXIS

NAME = "css"
RAMPDOWN_UNITS = ("labeled_epochs", "run")


def default_options() -> ml_collections.ConfigDict:
    """`config.method` of CSS with the values `cross_label.py` runs with (argparse and YAML).

    rep_temp (T_r of the representation softmax, `--temp` 0.5; `Model_cross`'s own default 0.1);
    contrast_temp (0.5); un_threshold (0.97, L_u's image weight); weak_threshold (0.7, unlabeled
    pixels in L_c); strong_threshold (0.8, anchors need q_c below it); num_queries (256);
    num_negatives (512); prototype_momentum (0.99); ema_momentum (0.99); rampdown_unit
    ('labeled_epochs' as the reference, or 'run'); rampdown_epochs (200) and rampdown_mult (-5);
    warmup_epochs (0: L_u uses the logit-space targets in the first labeled epochs);
    quantize_confidence (False; True = the reference's 8-bit confidences); labeled_rescale (VOC
    True: s ~ U(0.5, 1.5) on the labeled images; Cityscapes False).
    """
    return ml_collections.ConfigDict(dict(
        name=NAME, rep_temp=0.5, contrast_temp=0.5, un_threshold=0.97, weak_threshold=0.7, strong_threshold=0.8,
        num_queries=256, num_negatives=512, prototype_momentum=0.99, ema_momentum=0.99,
        rampdown_unit="labeled_epochs", rampdown_epochs=200, rampdown_mult=-5.0, warmup_epochs=0,
        quantize_confidence=False, labeled_rescale=True))


def configure(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Makes config `c` a CSS config: `default_options()` as `c.method`, the 'css' network with CSS's
    backbone (torchvision stem, floor max-pool, no multi-grid) and a 256-d representation head, no
    head lr multiplier, Nesterov, the 1e-4 lr floor. Widths, output stride and ASPP rates stay `c`'s."""
    c.method = default_options()
    c.model.name = NAME
    c.model.stem = "torchvision"
    c.model.maxpool_ceil = False
    c.model.multi_grid = False
    c.model.rep_dim = 256
    c.optim.lr_multi = 1.0
    c.optim.nesterov = True
    c.optim.min_lr = 1e-4
    c.data.css_scale_low, c.data.css_scale_high = css_data.STRONG_OPTIONS.values()
    return c


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing or invalid."""
    check_fields(opts, default_options(), "css", {"rampdown_unit": RAMPDOWN_UNITS})
    check_ranges(opts, option_ranges(opts))


def option_ranges(opts: ml_collections.ConfigDict) -> dict:
    """The valid values of the numeric and boolean `config.method` fields: key -> Range (csl_jax.methods.base)."""
    del opts  # no range depends on another field
    return {"rep_temp": above(0), "contrast_temp": above(0), "num_queries": whole_at_least(1),
            "num_negatives": whole_at_least(1), "rampdown_epochs": above(0), "rampdown_mult": (is_number, "a number"),
            "un_threshold": within(0.0, 1.0), "weak_threshold": within(0.0, 1.0), "strong_threshold": within(0.0, 1.0),
            "prototype_momentum": within(0.0, 1.0), "ema_momentum": within(0.0, 1.0),
            "warmup_epochs": at_least(0), "quantize_confidence": BOOLEAN, "labeled_rescale": BOOLEAN}


class CSS(TeacherStudentMethod):
    """CSS (module docstring). State: {'batch_stats', 'teacher': {'params', 'batch_stats'},
    'prototypes': (C, rep_dim) float32, zeros at init}. Predict functions 'teacher' and 'student'."""

    epoch_stream = "labeled"

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        check_options(config.method)
        check_network(config, NAME, paired_batches=True)
        super().__init__(config, num_classes)
        self.opts = config.method
        self.group_size = int(config.loss.group_size)
        self.rep_dim = int(config.model.get("rep_dim", 256))

    # -- networks, state, streams ----------------------------------------------------------------
    def init(self, rng, image_shape):
        """Student from `init_from`; the teacher its copy (params and statistics); zero prototypes."""
        student = init_network(self.model, self.config.model, rng, image_shape)
        state = {"batch_stats": student["batch_stats"],
                 "teacher": jax.tree.map(jnp.array, {"params": student["params"],
                                                     "batch_stats": student["batch_stats"]}),
                 "prototypes": jnp.zeros((self.num_classes, self.rep_dim), jnp.float32)}
        return student["params"], state

    def streams(self):
        labeled = "css_labeled_rescale" if self.opts.labeled_rescale else "css_labeled"
        return {"labeled": StreamSpec(source="labeled", batch="labeled", views=("css_photometric",), geometry=labeled),
                "unlabeled": StreamSpec(source="unlabeled", batch="unlabeled", views=("css_strong",),
                                        geometry="css_unlabeled")}

    def after_update(self, state, params, step):
        """Teacher params <- EMA with d = min(1 - 1/(step + 1), ema_momentum); its statistics untouched."""
        new = teacher.ema_update(state["teacher"]["params"], params, step, self.opts.ema_momentum)
        return dict(state, teacher=dict(state["teacher"], params=new))

    # -- loss ------------------------------------------------------------------------------------
    def rampdown_epoch(self, ctx: StepContext) -> jax.Array:
        """e of lambda(e): labeled epochs floor(step / L) (reference) or rampdown_epochs * step / T ('run')."""
        if self.opts.rampdown_unit == "labeled_epochs":
            return (ctx.step // ctx.steps_per_epoch).astype(jnp.float32)
        total = self.config.optim.get("total_steps", 0) or self.config.optim.epochs * ctx.steps_per_epoch
        return self.opts.rampdown_epochs * ctx.step.astype(jnp.float32) / total

    def loss(self, params, state, batch, ctx: StepContext):
        """One CSS step (module docstring)."""
        o, g, c = self.opts, self.group_size, self.num_classes
        lab, unl = batch["labeled"], batch["unlabeled"]
        n = lab["image"].shape[0]
        if unl["weak"].shape[0] != n or n % g:
            raise ValueError(f"CSS needs equal local labeled/unlabeled batches divisible by config.loss.group_size="
                             f"{g}; got {n} labeled and {unl['weak'].shape[0]} unlabeled")
        rng_t, rng_s, rng_con = jax.random.split(ctx.rng, 3)
        t_vars = jax.lax.stop_gradient(state["teacher"])
        protos = state["prototypes"]
        x = lab["css_image"]
        crop = x.shape[1:3]

        # 1. teacher: x (statistics only), then u
        _, t_stats = passes.train_pass(self.model, t_vars["params"], t_vars["batch_stats"], x, rng=rng_t)
        (_, t_out), t_stats = passes.train_pass(self.model, t_vars["params"], t_stats, unl["weak"], rng=rng_t)
        # 2. targets, warped, mixed, flipped with the strong image
        # the loader's padding is reflected image content: pseudo-labelled like the rest, as the reference
        everywhere = jnp.ones(unl["ignore"].shape, bool)
        targets = css_targets.teacher_targets(t_out["pred"], t_out["rep"], protos, everywhere,
                                              crop, o.rep_temp, o.quantize_confidence)
        targets["label"] = unl["label"]
        targets = css_targets.warp(targets, unl["warp_index"])
        u_img, targets = css_targets.mix_and_flip(unl["css_strong"], targets, unl["css_box"], unl["css_flip"], g)

        # 3. student: x, then u~ (two BN batches)
        (logits_l, out_l), stats = passes.train_pass(self.model, params, state["batch_stats"], x, rng=rng_s)
        (logits_u, out_u), stats = passes.train_pass(self.model, params, stats, u_img, rng=rng_s)

        # 4. prototypes from the global batch
        small = out_l["rep"].shape[1:3]
        down = lambda m: resize.downsample_nearest(m, small)  # noqa: E731
        y_l, y_u = down(lab["label"]), down(targets["y_cls"])
        cls_l = jnp.where(y_l != IGNORE_INDEX, y_l, c)
        cls_u = jnp.where(down(targets["c_cls"]) >= o.weak_threshold, y_u, c)
        rep = jnp.concatenate([out_l["rep"], out_u["rep"]])                    # (2n, h, w, D)
        classes = jnp.concatenate([cls_l, cls_u])                              # (2n, h, w)
        sums, counts = css_losses.class_sums(jax.lax.stop_gradient(rep).reshape(-1, rep.shape[-1]),
                                             classes.reshape(-1), c)
        sums, counts = jax.lax.psum((sums, counts), AXIS)
        new_protos = css_losses.update_prototypes(protos, sums, counts, o.prototype_momentum)
        q = jax.nn.softmax(css_losses.prototype_similarity(jax.lax.stop_gradient(rep), protos) / o.rep_temp, axis=-1)
        q_own = jnp.take_along_axis(q, jnp.minimum(classes, c - 1)[..., None], axis=-1)[..., 0]
        anchor_ok = (classes < c) & (q_own < o.strong_threshold)

        # 5. losses
        loss_sup = self.labeled_loss(logits_l, lab["label"])
        warm = ctx.step // ctx.steps_per_epoch < o.warmup_epochs
        y_un = jnp.where(warm, targets["y_cls"], targets["y_rep"])
        c_un = jnp.where(warm, targets["c_cls"], targets["c_rep"])
        loss_u, weights = css_losses.attention_threshold_loss(logits_u, y_un, c_un, o.un_threshold, g)
        loss_c, present = self._contrast(rep, classes, anchor_ok, new_protos, rng_con)
        ramp = css_losses.rampdown(self.rampdown_epoch(ctx), o.rampdown_epochs, o.rampdown_mult)
        loss = loss_sup + loss_u + ramp * loss_c

        new_state = dict(state, batch_stats=stats, prototypes=new_protos,
                         teacher=dict(state["teacher"], batch_stats=t_stats))
        valid_u = targets["y_rep"] != IGNORE_INDEX
        kept = valid_u & (targets["c_rep"] >= o.un_threshold)
        pl = passes.pseudo_label_metrics(targets["y_rep"], kept.astype(jnp.float32), kept,
                                         jnp.where(valid_u, 0, IGNORE_INDEX), targets["label"], axis_name=AXIS)
        counts_all = jax.lax.psum({"valid": jnp.sum(classes < c, dtype=jnp.float32),
                                   "anchors": jnp.sum(anchor_ok, dtype=jnp.float32),
                                   "agree": jnp.sum(valid_u & (targets["y_rep"] == targets["y_cls"]),
                                                    dtype=jnp.float32)}, AXIS)
        metrics = {"loss": loss, "loss_sup": loss_sup, "loss_u": loss_u, "loss_c": loss_c, "rampdown": ramp,
                   "cross_space_keep": pl["mask_ratio"], "image_weight": jnp.mean(weights),
                   "anchor_fraction": counts_all["anchors"] / jnp.maximum(counts_all["valid"], 1.0),
                   "space_agreement": counts_all["agree"] / jnp.maximum(pl["n_valid"], 1.0),
                   "present_classes": present, "pl_acc": pl["pl_acc"], "pl_acc_reliable": pl["pl_acc_reliable"]}
        return loss, (new_state, metrics)

    def _contrast(self, rep, classes, anchor_ok, prototypes, rng):
        """L_c averaged over this device's groups, and the mean number of present classes per group.

        rep: (2n, h, w, D), labeled first; classes (2n, h, w) int32 (C = not valid); anchor_ok bool.
        Group k holds labeled images [kg, (k+1)g) and the same unlabeled ones; its key is
        fold_in(rng, global group id).
        """
        o, g, c = self.opts, self.group_size, self.num_classes
        n = rep.shape[0] // 2

        def by_group(x):  # (2n, h, w, ...) -> (n // g, 2 g h w, ...)
            tail = x.shape[3:]
            lab, unl = (x[:n].reshape((n // g, -1) + tail), x[n:].reshape((n // g, -1) + tail))
            return jnp.concatenate([lab, unl], axis=1)

        group_ids = jax.lax.axis_index(AXIS) * (n // g) + jnp.arange(n // g)

        def one(r, cls, ok, gid):
            draws = css_losses.sample_contrast(jax.random.fold_in(rng, gid), cls, ok, prototypes, c,
                                               o.num_queries, o.num_negatives, o.contrast_temp)
            return (css_losses.contrast_loss(r, prototypes, draws, o.contrast_temp),
                    jnp.sum(draws["present"], dtype=jnp.float32))

        group_losses, present = jax.lax.map(lambda a: one(*a), (by_group(rep), by_group(classes),
                                                                by_group(anchor_ok), group_ids))
        return jnp.mean(group_losses), jnp.mean(present)
