"""UniMatch V2 (docs/methods/unimatch_v2.md): an EMA teacher, one strong stream of two views with
Complementary Dropout, on the DINOv2 + DPT model (`config.model.name='dpt'`).

One iteration, per device (spec §5; UniMatch-V2 `unimatch_v2.py:163-226` at f6afb4d):

1. the EMA teacher (0.996) predicts the weak views: pseudo-labels and weights from the selector
   (`threshold`: [max P >= tau], V2; `csl`: CSL's soft weights, the `csl` variant);
2. S1 and S2 are CutMixed with the partner's un-mixed views of the same index, the partner being
   the reversed reference per-GPU batch (`views.reverse_groups` over `config.loss.group_size`
   samples, across devices when needed); the targets (label, weight, ignore) likewise;
3. the student runs x, then [S1; S2] with the Complementary Dropout masks [m1; m2] on its four
   tapped encoder maps (`comp_drop.masks`, drawn per global sample id);
4. L = (L_x + (L_s1 + L_s2) / 2) / 2, L_sk the weighted CE over all valid pixels of a loss group.

`second_view='none'` is FixMatch with an EMA teacher (`fixmatch.py`: one strong view, no
Complementary Dropout, L = (L_x + L_s) / 2); `second_view='tmp'` replaces S2 by CSL's TMP view (own
targets, no CutMix), paired with S1 for Complementary Dropout: the CSL ablation. The model has no
BatchNorm, so train and inference passes are the same function and no BN policy applies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax import optim
from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import StreamSpec
from csl_jax.methods.base import (BOOLEAN, StepContext, TeacherStudentMethod, above, check_fields, check_network,
                                  check_ranges, with_later_fields, within)
from csl_jax.methods.parts import entropy_split, losses, passes, pseudo_labels, teacher, views
from csl_jax.methods.unimatch_v2 import comp_drop
from csl_jax.parallel import AXIS

NAME = "unimatch_v2"
#: unlabeled views by `config.method.second_view`.
_VIEWS = {"cutmix": ("strong", "strong2"), "none": ("strong",), "tmp": ("strong", "tmp")}
#: pseudo-label rules on the teacher's softmax: the shared selectors and U2PL's entropy partition
SELECTORS = pseudo_labels.SELECTORS + ("u2pl_entropy",)
_CHOICES = {"selector": SELECTORS, "second_view": tuple(_VIEWS), "variant": ("", "csl", "u2pl_entropy")}
#: presets: the options each changes from the UniMatch V2 defaults (spec §14).
PRESETS = {"unimatch_v2": {}, "fixmatch_v2": {"second_view": "none", "comp_drop": False}}
#: variants of `unimatch_v2`: CSL's selector on the EMA teacher's weak-view softmax (spec §14 "CSL on top"),
#: U2PL's entropy partition in its place.
VARIANTS = {"": {}, "csl": {"selector": "csl"}, "u2pl_entropy": {"selector": "u2pl_entropy"}}
#: fold_in index of the Complementary Dropout key in the step key.
_COMP_DROP_KEY = 7


def default_options(name: str = NAME, variant: str = "") -> ml_collections.ConfigDict:
    """`config.method` of a preset ('unimatch_v2' | 'fixmatch_v2') and variant ('' | 'csl').

    Fields: name; variant; selector ('threshold' | 'csl' | 'u2pl_entropy'); tau (threshold, `conf_thresh`
    0.95); alpha, variance_scaling, eps (CSL selector); drop_percent (U2PL's entropy partition: the
    share kept at the first epoch, annealed to 100 %); ema_momentum (0.996); second_view ('cutmix' |
    'none' | 'tmp'); comp_drop (bool), comp_drop_keep (share of each group left unperturbed, 0.5),
    comp_drop_scale (2.0); lock_backbone (freeze the encoder: no update, no backward).
    """
    if name not in PRESETS or variant not in VARIANTS:
        raise ValueError(f"UniMatch V2 preset {name!r} / variant {variant!r}: expected one of {sorted(PRESETS)} / "
                         f"{sorted(VARIANTS)}")
    opts = ml_collections.ConfigDict(dict(
        name=name, variant=variant, selector="threshold", tau=0.95, alpha=8.0, variance_scaling=False, eps=1e-8,
        drop_percent=80.0, ema_momentum=0.996, second_view="cutmix", comp_drop=True, comp_drop_keep=0.5,
        comp_drop_scale=2.0, lock_backbone=False))
    opts.update(PRESETS[name])
    opts.update(VARIANTS[variant])
    return opts


def option_ranges() -> dict:
    """The valid values of the numeric and boolean `config.method` fields (csl_jax.methods.base Ranges)."""
    return {"tau": within(0.0, 1.0), "drop_percent": within(0.0, 100.0), "alpha": above(0), "eps": above(0),
            "ema_momentum": within(0.0, 1.0, True),
            "comp_drop_keep": within(0.0, 1.0), "comp_drop_scale": above(0), "comp_drop": BOOLEAN,
            "variance_scaling": BOOLEAN, "lock_backbone": BOOLEAN}


#: fields added after the method's first release, with the values older saved configs meant.
LATER_FIELDS = {"drop_percent": 80.0}


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing or invalid."""
    opts = with_later_fields(opts, LATER_FIELDS)
    check_fields(opts, default_options(), NAME, _CHOICES)
    check_ranges(opts, option_ranges())


class UniMatchV2(TeacherStudentMethod):
    """UniMatch V2 / FixMatch-with-EMA step (module docstring), options from `config.method`.

    Streams: 'labeled' (epochs of |U| samples) and 'unlabeled' with the views of `second_view`; no
    mix stream. params: the DPT's {'backbone', 'head'}; state: {'batch_stats': {} (no BN),
    'teacher': {'params', 'batch_stats'}}. Predict functions 'teacher' (picks the best checkpoint)
    and 'student'.
    """

    epoch_stream = "unlabeled"
    has_diagnostics = True
    later_fields = LATER_FIELDS

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        check_options(config.method)
        check_network(config, "dpt")
        super().__init__(config, num_classes)
        self.opts = with_later_fields(config.method, LATER_FIELDS)

    def init(self, rng, image_shape):
        """Student params and {'batch_stats': {}, 'teacher': a copy of the student}."""
        params, state = super().init(rng, image_shape)
        state["teacher"] = jax.tree.map(jnp.array, {"params": params, "batch_stats": state["batch_stats"]})
        return params, state

    def param_labels(self, params):
        """'backbone' / 'head'; the encoder is 'frozen' with `lock_backbone` (spec §7)."""
        labels = optim.param_groups(params)
        if not self.opts.lock_backbone:
            return labels
        return dict(labels, backbone=jax.tree.map(lambda _: "frozen", labels["backbone"]))

    def streams(self):
        return {"labeled": StreamSpec(source="labeled", batch="labeled", epoch_of="unlabeled"),
                "unlabeled": StreamSpec(source="unlabeled", batch="unlabeled", views=_VIEWS[self.opts.second_view])}

    def after_update(self, state, params, step):
        """EMA of the teacher, d = min(1 - 1/(t+1), ema_momentum) (spec §6)."""
        student = {"params": params, "batch_stats": state["batch_stats"]}
        return dict(state, teacher=teacher.ema_update(state["teacher"], student, step, self.opts.ema_momentum))

    # -- loss ------------------------------------------------------------------------------------
    def _student(self, params, images, feature_scale=None):
        """Student logits (B, H, W, C) float32, with gradient (train and inference mode are equal: no BN)."""
        return self.model.apply({"params": params}, images, train=True, feature_scale=feature_scale)[0]

    def loss(self, params, state, batch, ctx: StepContext):
        """Per-device loss of one UniMatch V2 step, (state, metrics)."""
        o = self.opts
        partner = functools.partial(views.reverse_groups, group=self.config.loss.group_size, axis_name=AXIS,
                                    num_devices=ctx.num_devices, what="config.loss.group_size")
        if o.lock_backbone:  # no backward through the frozen encoder
            params = dict(params, backbone=jax.lax.stop_gradient(params["backbone"]))
        lab, unl = batch["labeled"], batch["unlabeled"]
        n_unl = unl["weak"].shape[0]

        # 1. pseudo-labels from the EMA teacher, at crop resolution
        t_logits = passes.eval_pass(self.model, state["teacher"], unl["weak"])
        own, reliable = self._targets(t_logits, unl["ignore"], ctx)

        # 2. strong views CutMixed with the reversed batch's un-mixed views (targets likewise)
        partner_targets = jax.tree.map(partner, own)
        strong = [views.cutmix(unl["cutmix_box"], partner(unl["strong"]), unl["strong"])]
        targets = [views.cutmix(unl["cutmix_box"], partner_targets, own)]
        if o.second_view == "cutmix":
            strong.append(views.cutmix(unl["cutmix_box2"], partner(unl["strong2"]), unl["strong2"]))
            targets.append(views.cutmix(unl["cutmix_box2"], partner_targets, own))
        elif o.second_view == "tmp":
            strong.append(views.trusted_mask(unl["tmp"], reliable, unl["block_mask"]))
            targets.append(own)

        # 3. student passes; Complementary Dropout on the two strong views
        scale = None
        if o.comp_drop and len(strong) == 2:
            ids = ctx.sample_ids("unlabeled", n_unl)
            m1, m2 = comp_drop.masks(jax.random.fold_in(ctx.rng, _COMP_DROP_KEY), ids,
                                     ids - ctx.stream_offsets["unlabeled"], params["backbone"]["cls_token"].shape[-1],
                                     self.config.loss.group_size, o.comp_drop_keep, o.comp_drop_scale)
            scale = jnp.concatenate([m1, m2])
        logits_x = self._student(params, lab["image"])
        strong_logits = jnp.split(self._student(params, jnp.concatenate(strong), scale), len(strong))

        # 4. losses
        metrics = {"loss_x": self.labeled_loss(logits_x, lab["label"])}
        for k, (z, t) in enumerate(zip(strong_logits, targets), 1):
            metrics[f"loss_s{k}"] = losses.weighted_unlabeled_ce(z, t["label"], t["weight"], t["ignore"],
                                                                 group_size=self.config.loss.group_size,
                                                                 axis_name=AXIS)
        unlabeled = sum(metrics[f"loss_s{k}"] for k in range(1, len(strong) + 1)) / len(strong)
        loss = (metrics["loss_x"] + unlabeled) / 2
        metrics["loss"] = loss
        metrics.update(passes.pseudo_label_metrics(own["label"], own["weight"], reliable, unl["ignore"],
                                                   unl["label"], axis_name=AXIS))
        return loss, (state, metrics)

    def _targets(self, logits, ignore, ctx: StepContext):
        """({'label', 'weight', 'ignore'}, reliable) of teacher logits by `selector`; 'u2pl_entropy' keeps
        the pixels below the group's entropy percentile of this epoch (U2PL's partition, weights 0 / 1)."""
        if self.opts.selector != "u2pl_entropy":
            return passes.pseudo_targets(logits, ignore, self.opts)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        percent = entropy_split.drop_percentile(ctx.step // ctx.steps_per_epoch,
                                                self.schedule_epochs(ctx.steps_per_epoch), self.opts.drop_percent)
        weight, kept = entropy_split.entropy_split_weights(probs, ignore != IGNORE_INDEX, percent,
                                                           self.config.loss.group_size)
        return {"label": jnp.argmax(probs, axis=-1).astype(jnp.int32), "weight": weight, "ignore": ignore}, kept

    def diagnostics(self, train_state, batch):
        """The pseudo-label plots' arrays from the teacher's weak-view logits (`passes.pseudo_label_diagnostics`)."""
        unlabeled = batch["unlabeled"]
        logits = self._predict(self.eval_variables(train_state, "teacher"), unlabeled["weak"])
        return passes.pseudo_label_diagnostics(logits, unlabeled, self.opts)


def configure(c: ml_collections.ConfigDict, name: str = NAME, variant: str = "") -> ml_collections.ConfigDict:
    """Sets `c.method` to the preset `name` and variant (see `default_options`); returns `c`."""
    c.method = default_options(name, variant)
    return c
