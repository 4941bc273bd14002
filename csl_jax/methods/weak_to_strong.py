"""Weak-to-strong consistency: CSL, UniMatch and FixMatch as one step configured by options.

One iteration (docs/methods/csl.md §9, docs/methods/unimatch.md), per device:

1. pseudo-labels, float32, no gradient: with `teacher='ema'` the EMA teacher (inference mode)
   predicts [u_w; u'_w] in one call; with `teacher='online'` the student's clean u_w logits of the
   main pass are used, and the mix batch u'_w gets its own no-grad student pass (train-mode BN
   whose statistics are discarded, or eval mode: `mix_pass_bn`). Weights and the reliable mask
   come from the selector ('csl' soft weights or a 'threshold'), per image.
2. strong inputs: u_s CutMixed with the mix batch's strong view (targets likewise); the second
   view is TMP (`where(reliable & K, 0, u_m)`, own targets), a second CutMixed strong view
   (UniMatch: pasted from the mix batch's second strong view; the released CSL code: from its
   first, `second_view_source='strong'`), or none (FixMatch).
3. student, train-mode BN: the main pass [x; u_w] (with FP when `use_fp`) updates the running
   statistics; the strong pass [u_s; u_2] keeps its statistics update only when
   `strong_pass_updates_bn` (UniMatch, FixMatch) and discards it otherwise (CSL).
4. L = (L_x + w_s (L_s + L_2) + 0.5 L_fp) / 2, where the strong views share 0.5 with FP (1 without
   FP) equally: CSL/UniMatch (L_x + 0.25 L_s + 0.25 L_2 + 0.5 L_fp)/2, FixMatch (L_x + L_s)/2.

The CSL variants (`VARIANTS`, `variant_options`: 'csl' the spec, 'csl_online' the spec with the
official online teacher, 'csl_released' the released code) are option sets of the 'csl' method,
recorded as `config.method.variant`.

The method names only select option presets (`default_options`, applied when a config is made);
every option can be overridden from the config (`--config.method.teacher=online`). Changing only
`config.method.name` does not switch the options, so a name that contradicts them (the options of
another preset, e.g. UniMatch's under name='fixmatch') is refused (`check_options`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.data import StreamSpec
from csl_jax.config_checks import is_number
from csl_jax.methods.base import (BOOLEAN, Method, StepContext, above, check_ranges, teacher_or_student, within,
                                  with_later_fields as _fill_later_fields)
from csl_jax.methods.parts import losses, passes, pseudo_labels, teacher, views
from csl_jax.parallel import AXIS

#: unlabeled views the data pipeline must produce, by `config.method.second_view`.
_VIEWS = {"tmp": ("strong", "tmp"), "cutmix": ("strong", "strong2"), "none": ("strong",)}
#: metric name of the second strong view's loss.
_SECOND_LOSS = {"tmp": "loss_m", "cutmix": "loss_s2"}
_CHOICES = {
    "selector": pseudo_labels.SELECTORS,
    "second_view": tuple(_VIEWS),
    "teacher": ("ema", "online"),
    "mix_pass_bn": ("train", "eval"),
    "second_view_source": ("strong2", "strong"),
}
#: CSL variant -> the options it changes from default_options('csl') (docs/methods/csl.md §10).
VARIANTS = {
    "csl": {},
    "csl_online": {"teacher": "online"},
    "csl_released": {"teacher": "online", "alpha": 2.0, "variance_scaling": True, "second_view": "cutmix",
                     "second_view_source": "strong", "strong_pass_updates_bn": True},
}


def default_options(name: str) -> ml_collections.ConfigDict:
    """The `config.method` preset of 'csl', 'unimatch' or 'fixmatch' (docs/methods/csl.md §10).

    Fields: name; variant (a label: the CSL variant, '' for the other presets); selector ('csl' |
    'threshold'); second_view ('tmp' | 'cutmix' | 'none'); second_view_source (the mix batch's view
    pasted into the second CutMix view: 'strong2' | 'strong'); use_fp; alpha, variance_scaling, eps
    (CSL selector); tau (threshold selector); teacher ('ema' | 'online'); ema_momentum; mix_pass_bn
    ('train': batch statistics, discarded | 'eval': running statistics; the online mix-batch pass
    only); strong_pass_updates_bn.
    """
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} has no semi-supervised preset; valid: {sorted(METHODS)}")
    opts = ml_collections.ConfigDict()
    opts.name = name
    opts.variant = ""  # a CSL variant name (VARIANTS); "" for the other presets
    opts.selector = "csl"
    opts.second_view = "tmp"
    opts.second_view_source = "strong2"
    opts.use_fp = True
    opts.alpha = 8.0
    opts.variance_scaling = False
    opts.eps = 1e-8
    opts.tau = 0.95
    opts.teacher = "ema"
    opts.ema_momentum = 0.99
    opts.mix_pass_bn = "train"
    opts.strong_pass_updates_bn = False
    if name in ("unimatch", "fixmatch"):
        opts.selector = "threshold"
        opts.second_view = "cutmix" if name == "unimatch" else "none"
        opts.use_fp = name == "unimatch"
        opts.teacher = "online"
        opts.mix_pass_bn = "eval"
        opts.strong_pass_updates_bn = True
    return opts


def variant_options(variant: str) -> ml_collections.ConfigDict:
    """The `config.method` of a CSL variant: default_options('csl') with `VARIANTS[variant]` applied.

    'csl': the spec (EMA teacher, alpha 8, unscaled variance, TMP). 'csl_online': the spec with
    the official online teacher. 'csl_released': the released code (online teacher, alpha 2 (its
    weight function is called without alpha), variance scaled by (C-1)^2/(2(1-p)), a second CutMix
    view pasted from the mix batch's first strong view, strong pass updating BN).
    """
    if variant not in VARIANTS:
        raise ValueError(f"CSL variant {variant!r} is not known; valid: {sorted(VARIANTS)}")
    opts = default_options("csl")
    opts.update(dict(VARIANTS[variant], variant=variant))
    return opts


def _preset_keys() -> tuple[str, ...]:
    """The options on which the presets differ (selector, second_view, use_fp, teacher, ...)."""
    presets = [default_options(name) for name in METHODS]
    return tuple(k for k in presets[0].keys()
                 if k not in ("name", "variant") and len({p[k] for p in presets}) > 1)


def _flag(key: str, value) -> str:
    return f"--config.method.{key}={value}"


def preset_mismatch(opts: ml_collections.ConfigDict) -> str | None:
    """Why `opts.name` contradicts the other options, or None.

    The name does not switch the options (`default_options` builds them when a config is made), so
    changing only the name would train the old preset under the new name. A contradiction is an
    options set that takes another preset's value on every option where that preset differs from
    the named one: e.g. name='fixmatch' with UniMatch's second_view='cutmix' and use_fp=True.
    Options changed one by one from the named preset (ablations such as teacher='online' for CSL)
    are not contradictions.
    """
    name = opts.name
    named = default_options(name)
    for other in METHODS:
        preset = default_options(other)
        keys = [k for k in _preset_keys() if preset[k] != named[k]]
        if other == name or not keys or any(opts[k] != preset[k] for k in keys):
            continue
        theirs = ", ".join(f"{k}={opts[k]!r}" for k in keys)
        ours = ", ".join(f"{k}={named[k]!r}" for k in keys)
        return (f"config.method.name={name!r}, but the other config.method options are those of the {other!r} "
                f"preset ({theirs}; {name!r} has {ours}); the name does not change them, so this would train "
                f"{other} labelled {name}. To train {name}, also set {' '.join(_flag(k, named[k]) for k in keys)} "
                f"(model, data and schedule stay the config file's); to train {other}, set "
                f"config.method.name={other!r}.")
    return None


#: fields added after the first release, with the values configs saved in older workdirs meant.
LATER_FIELDS = {"variant": "", "second_view_source": "strong2"}


def with_later_fields(opts: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`opts` with `LATER_FIELDS` filled in where absent (configs saved in older workdirs). Returns a copy."""
    return _fill_later_fields(opts, LATER_FIELDS)


def option_ranges(opts: ml_collections.ConfigDict) -> dict:
    """The valid values of the numeric and boolean `config.method` fields: key -> Range (csl_jax.methods.base).
    ema_momentum is a momentum in [0, 1) with teacher='ema' and unused (any number) with 'online'."""
    momentum = within(0.0, 1.0, high_open=True) if opts.teacher == "ema" else (is_number, "a number")
    return {"alpha": above(0), "eps": above(0), "tau": within(0.0, 1.0), "ema_momentum": momentum,
            "use_fp": BOOLEAN, "variance_scaling": BOOLEAN, "strong_pass_updates_bn": BOOLEAN}


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing, invalid or contradicts the name."""
    name = opts.get("name")
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} has no semi-supervised preset; valid: {sorted(METHODS)}")
    opts = with_later_fields(opts)
    for key in default_options(name).keys():
        if key not in opts:
            raise ValueError(
                f"config.method.{key} is missing; config.method.name={name!r} needs all fields of "
                f"csl_jax.methods.weak_to_strong.default_options({name!r}), which the semi-supervised configs have "
                f"(configs/csl_*.py, configs/unimatch_*.py, configs/demo.py:{name}); a supervised config has none")
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise ValueError(f"config.method.{key}={opts[key]!r}; expected one of {list(choices)}")
    check_ranges(opts, option_ranges(opts))
    message = preset_mismatch(opts)
    if message:
        raise ValueError(message)
    valid_variants = sorted(VARIANTS) + [""] if name == "csl" else [""]
    if opts.variant not in valid_variants:
        raise ValueError(f"config.method.variant={opts.variant!r} is not a variant of {name!r}; "
                         f"valid: {valid_variants}")


class WeakToStrong(Method):
    """CSL / UniMatch / FixMatch step (see the module docstring), options from `config.method`.

    Streams: 'labeled' (epochs of |U| samples), 'unlabeled' and 'mix' with the views of
    `config.method.second_view`; an epoch is one pass over the unlabeled images. State:
    {'batch_stats'} of the student, plus {'teacher': {'params', 'batch_stats'}} for teacher='ema'.
    Predict functions: 'teacher' and 'student' (teacher='ema', the teacher picks the best
    checkpoint) or 'model' (teacher='online').
    """

    epoch_stream = "unlabeled"
    has_diagnostics = True
    later_fields = LATER_FIELDS

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        check_options(config.method)
        super().__init__(config, num_classes)
        self.opts = with_later_fields(config.method)
        self.unlabeled_views = _VIEWS[self.opts.second_view]
        self.best_predict = "teacher" if self.opts.teacher == "ema" else "model"

    # -- networks, state, streams ----------------------------------------------------------------
    def init(self, rng, image_shape):
        """Student params and {'batch_stats'}; with teacher='ema' also {'teacher': copy of the student}."""
        params, state = super().init(rng, image_shape)
        if self.opts.teacher == "ema":
            state["teacher"] = jax.tree.map(jnp.array, {"params": params, "batch_stats": state["batch_stats"]})
        return params, state

    def streams(self):
        unlabeled = StreamSpec(source="unlabeled", batch="unlabeled", views=self.unlabeled_views)
        # the mix batch needs its second strong view only as a CutMix source
        mix_views = ("strong",) if self.opts.second_view == "cutmix" and self.opts.second_view_source == "strong" \
            else self.unlabeled_views
        return {"labeled": StreamSpec(source="labeled", batch="labeled", epoch_of="unlabeled"),
                "unlabeled": unlabeled, "mix": dataclasses.replace(unlabeled, views=mix_views)}

    def after_update(self, state, params, step):
        """EMA update of the teacher's params and BN statistics (teacher='ema'), d = min(1-1/(t+1), m)."""
        if self.opts.teacher != "ema":
            return state
        student = {"params": params, "batch_stats": state["batch_stats"]}
        return dict(state, teacher=teacher.ema_update(state["teacher"], student, step, self.opts.ema_momentum))

    # -- evaluation ------------------------------------------------------------------------------
    def predict_fns(self):
        """'teacher' and 'student' (teacher='ema'), or 'model': the network in inference mode."""
        if self.opts.teacher == "ema":
            return {"teacher": self._predict, "student": self._predict}
        return {"model": self._predict}

    def eval_variables(self, train_state, name):
        """The EMA teacher's variables for 'teacher', else the student's."""
        self._check_predict_name(name)
        return teacher_or_student(train_state, name)

    # -- loss ------------------------------------------------------------------------------------
    def _targets(self, logits, ignore):
        return passes.pseudo_targets(logits, ignore, self.opts)

    def _unlabeled_loss(self, logits: jax.Array, targets: Mapping[str, jax.Array]) -> jax.Array:
        """Weighted CE over the valid-pixel count, per loss group (docs/methods/csl.md §7)."""
        return losses.weighted_unlabeled_ce(logits, targets["label"], targets["weight"], targets["ignore"],
                                            group_size=self.config.loss.group_size, axis_name=AXIS)

    def loss(self, params, state, batch, ctx: StepContext):
        """Per-device loss of one semi-supervised step, (new state, metrics)."""
        o = self.opts
        lab, unl, mix = batch["labeled"], batch["unlabeled"], batch["mix"]
        n_lab, n_unl = lab["image"].shape[0], unl["weak"].shape[0]
        lab_ids, unl_ids = ctx.sample_ids("labeled", n_lab), ctx.sample_ids("unlabeled", n_unl)

        # 1. pseudo-labels from the EMA teacher (both batches in one inference call)
        if o.teacher == "ema":
            t_logits = passes.eval_pass(self.model, state["teacher"], jnp.concatenate([unl["weak"], mix["weak"]]))
            main_t, reliable = self._targets(t_logits[:n_unl], unl["ignore"])
            mix_t, _ = self._targets(t_logits[n_unl:], mix["ignore"])
        elif o.mix_pass_bn == "eval":
            mix_logits = passes.eval_pass(self.model, {"params": params, "batch_stats": state["batch_stats"]},
                                          mix["weak"])
            mix_t, _ = self._targets(mix_logits, mix["ignore"])
        else:
            mix_logits = passes.no_grad_train_pass(self.model, params, state["batch_stats"], mix["weak"], rng=ctx.rng,
                                                   sample_ids=ctx.sample_ids("mix", n_unl))
            mix_t, _ = self._targets(mix_logits, mix["ignore"])

        # 2. student main pass [x; u_w], updates the running statistics
        (logits, out), stats = passes.train_pass(
            self.model, params, state["batch_stats"], jnp.concatenate([lab["image"], unl["weak"]]), rng=ctx.rng,
            sample_ids=jnp.concatenate([lab_ids, unl_ids]), feature_perturb=o.use_fp)
        if o.teacher == "online":
            main_t, reliable = self._targets(logits[n_lab:], unl["ignore"])

        # 3. strong views and their targets
        strong = [views.cutmix(unl["cutmix_box"], mix["strong"], unl["strong"])]
        targets = [views.cutmix(unl["cutmix_box"], mix_t, main_t)]
        if o.second_view == "tmp":
            strong.append(views.trusted_mask(unl["tmp"], reliable, unl["block_mask"]))
            targets.append(main_t)
        elif o.second_view == "cutmix":
            strong.append(views.cutmix(unl["cutmix_box2"], mix[o.second_view_source], unl["strong2"]))
            targets.append(views.cutmix(unl["cutmix_box2"], mix_t, main_t))
        (strong_logits, _), strong_stats = passes.train_pass(
            self.model, params, stats, jnp.concatenate(strong), rng=ctx.rng,
            sample_ids=jnp.concatenate([unl_ids] * len(strong)))
        if o.strong_pass_updates_bn:
            stats = strong_stats

        # 4. losses
        metrics = {"loss_x": self.labeled_loss(logits[:n_lab], lab["label"])}
        strong_losses = [self._unlabeled_loss(z, t) for z, t in zip(jnp.split(strong_logits, len(strong)), targets)]
        metrics["loss_s"] = strong_losses[0]
        if o.second_view != "none":
            metrics[_SECOND_LOSS[o.second_view]] = strong_losses[1]
        unlabeled = (0.5 if o.use_fp else 1.0) / len(strong) * sum(strong_losses)
        if o.use_fp:
            metrics["loss_fp"] = self._unlabeled_loss(out["logits_fp"][n_lab:], main_t)
            unlabeled = unlabeled + 0.5 * metrics["loss_fp"]
        loss = (metrics["loss_x"] + unlabeled) / 2
        metrics["loss"] = loss
        metrics.update(passes.pseudo_label_metrics(main_t["label"], main_t["weight"], reliable, unl["ignore"],
                                                   unl["label"], axis_name=AXIS))
        return loss, (dict(state, batch_stats=stats), metrics)

    # -- plots -------------------------------------------------------------------------------------
    def diagnostics(self, train_state, batch):
        """What the pseudo-label plots need (`passes.pseudo_label_diagnostics`), for the unlabeled images of
        `batch` (outside shard_map). The evaluated model (the EMA teacher, or the student for
        teacher='online', whose in-step pseudo-labels use train-mode BN instead) predicts the weak views
        in inference mode."""
        unlabeled = batch["unlabeled"]
        logits = self._predict(self.eval_variables(train_state, self.best_predict), unlabeled["weak"])
        return passes.pseudo_label_diagnostics(logits, unlabeled, self.opts)


METHODS = {"csl": WeakToStrong, "unimatch": WeakToStrong, "fixmatch": WeakToStrong}
