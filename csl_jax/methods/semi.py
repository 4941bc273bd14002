"""Weak-to-strong consistency: CSL, UniMatch and FixMatch as one step configured by options.

One iteration (docs/methods/csl.md §9, docs/methods/unimatch.md), per device:

1. pseudo-labels, float32, no gradient: with `teacher='ema'` the EMA teacher (inference mode)
   predicts [u_w; u'_w] in one call; with `teacher='online'` the student's clean u_w logits of the
   main pass are used, and the mix batch u'_w gets its own no-grad student pass (train-mode BN
   whose statistics are discarded, or eval mode: `mix_pass_bn`). Weights and the reliable mask
   come from the selector ('csl' soft weights or a 'threshold'), per image.
2. strong inputs: u_s CutMixed with the mix batch's strong view (targets likewise); the second
   view is TMP (`where(reliable & K, 0, u_m)`, own targets), a second CutMixed strong view
   (UniMatch), or none (FixMatch).
3. student, train-mode BN: the main pass [x; u_w] (with FP when `use_fp`) updates the running
   statistics; the strong pass [u_s; u_2] keeps its statistics update only when
   `strong_pass_updates_bn` (UniMatch, FixMatch) and discards it otherwise (CSL).
4. L = (L_x + w_s (L_s + L_2) + 0.5 L_fp) / 2, where the strong views share 0.5 with FP (1 without
   FP) equally: CSL/UniMatch (L_x + 0.25 L_s + 0.25 L_2 + 0.5 L_fp)/2, FixMatch (L_x + L_s)/2.

The method names only select option presets (`default_options`, applied when a config is made);
every option can be overridden from the config (`--config.method.teacher=online`). Changing only
`config.method.name` does not switch the options, so a name that contradicts them (the options of
another preset, e.g. UniMatch's under name='fixmatch') is refused (`check_options`).
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csl_jax import losses, pseudo_labels, teacher, views
from csl_jax.constants import IGNORE_INDEX
from csl_jax.methods.base import Method, StepContext, global_sample_ids
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
}


def default_options(name: str) -> ml_collections.ConfigDict:
    """The `config.method` preset of 'csl', 'unimatch' or 'fixmatch' (docs/methods/csl.md §10).

    Fields: name; selector ('csl' | 'threshold'); second_view ('tmp' | 'cutmix' | 'none'); use_fp;
    alpha, variance_scaling, eps (CSL selector); tau (threshold selector); teacher ('ema' |
    'online'); ema_momentum; mix_pass_bn ('train': batch statistics, discarded | 'eval': running
    statistics; the online mix-batch pass only); strong_pass_updates_bn.
    """
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} has no semi-supervised preset; valid: {sorted(METHODS)}")
    opts = ml_collections.ConfigDict()
    opts.name = name
    opts.selector = "csl"
    opts.second_view = "tmp"
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


def _preset_keys() -> tuple[str, ...]:
    """The options on which the presets differ (selector, second_view, use_fp, teacher, ...)."""
    presets = [default_options(name) for name in METHODS]
    return tuple(k for k in presets[0].keys() if k != "name" and len({p[k] for p in presets}) > 1)


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


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing, invalid or contradicts the name."""
    name = opts.get("name")
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} has no semi-supervised preset; valid: {sorted(METHODS)}")
    for key in default_options(name).keys():
        if key not in opts:
            raise ValueError(
                f"config.method.{key} is missing; config.method.name={name!r} needs all fields of "
                f"csl_jax.methods.semi.default_options({name!r}), which the semi-supervised configs have "
                f"(configs/csl_*.py, configs/unimatch_*.py, configs/demo.py:{name}); a supervised config has none")
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise ValueError(f"config.method.{key}={opts[key]!r}; expected one of {list(choices)}")
    if opts.teacher == "ema" and not 0.0 <= opts.ema_momentum < 1.0:
        raise ValueError(f"config.method.ema_momentum={opts.ema_momentum} must be in [0, 1)")
    if opts.alpha <= 0:
        raise ValueError(f"config.method.alpha={opts.alpha} must be > 0")
    message = preset_mismatch(opts)
    if message:
        raise ValueError(message)


def pseudo_label_metrics(pseudo_label: jax.Array, weight: jax.Array, reliable: jax.Array, ignore: jax.Array,
                         label: jax.Array, axis_name: str | None = None) -> dict:
    """Cheap diagnostics of the main batch's pseudo-labels, float32 scalars.

    Args:
      pseudo_label: (B, H, W) int32 argmax of the teacher's probabilities.
      weight: (B, H, W) float32 selector weights; reliable: (B, H, W) bool (weight == 1).
      ignore: (B, H, W) int32, 255 on crop padding.
      label: (B, H, W) int32 ground truth of the unlabeled images, 255 where unknown (all 255 when
        the dataset has none).
      axis_name: when set (inside shard_map), counts are summed over that axis first, so every
        value is the global one, whatever the number of devices.
    Returns:
      mask_ratio (reliable share of valid pixels), mean_weight (over valid pixels), pl_acc,
      pl_acc_reliable, pl_acc_rest (pseudo-label accuracy over valid pixels with a ground truth:
      all, reliable, not reliable; 0 when there is no such pixel), and the counts they are made
      of (n_valid, n_reliable, n_labeled, n_correct, n_labeled_reliable, n_correct_reliable), so
      that sums over steps can be formed.
    """
    valid = ignore != IGNORE_INDEX
    labeled = valid & (label != IGNORE_INDEX)
    correct = labeled & (pseudo_label == label)
    reliable = reliable & valid

    def count(mask):
        return jnp.sum(mask, dtype=jnp.float32)

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)

    n = {
        "n_valid": count(valid),
        "n_reliable": count(reliable),
        "n_labeled": count(labeled),
        "n_correct": count(correct),
        "n_labeled_reliable": count(labeled & reliable),
        "n_correct_reliable": count(correct & reliable),
    }
    weight_sum = jnp.sum(jnp.where(valid, weight, 0.0))
    if axis_name is not None:
        n, weight_sum = jax.lax.psum((n, weight_sum), axis_name)
    return dict(
        n,
        mask_ratio=ratio(n["n_reliable"], n["n_valid"]),
        mean_weight=ratio(weight_sum, n["n_valid"]),
        pl_acc=ratio(n["n_correct"], n["n_labeled"]),
        pl_acc_reliable=ratio(n["n_correct_reliable"], n["n_labeled_reliable"]),
        pl_acc_rest=ratio(n["n_correct"] - n["n_correct_reliable"], n["n_labeled"] - n["n_labeled_reliable"]),
    )


class SemiSupervised(Method):
    """CSL / UniMatch / FixMatch step (see the module docstring), options from `config.method`.

    `unlabeled_views` is set per instance from `config.method.second_view`.
    """

    uses_unlabeled = True

    def __init__(self, config: ml_collections.ConfigDict, model, num_classes: int):
        super().__init__(config, model, num_classes)
        opts = config.method
        check_options(opts)
        self.opts = opts
        self.unlabeled_views = _VIEWS[opts.second_view]

    # -- state ---------------------------------------------------------------------------------
    def init_extra(self, variables):
        """{'teacher': copy of the student's {'params', 'batch_stats'}} for teacher='ema', else {}."""
        if self.opts.teacher != "ema":
            return {}
        return {"teacher": jax.tree.map(jnp.array, {"params": variables["params"],
                                                     "batch_stats": variables.get("batch_stats", {})})}

    def update_extra(self, extra, params, batch_stats, step):
        """EMA update of the teacher's params and BN statistics (teacher='ema'), d = min(1-1/(t+1), m)."""
        if self.opts.teacher != "ema":
            return extra
        student = {"params": params, "batch_stats": batch_stats}
        return {"teacher": teacher.ema_update(extra["teacher"], student, step, self.opts.ema_momentum)}

    def eval_variables(self, params, batch_stats, extra):
        """The EMA teacher for teacher='ema', else the student."""
        if self.opts.teacher == "ema":
            return extra["teacher"]
        return {"params": params, "batch_stats": batch_stats}

    # -- pieces ----------------------------------------------------------------------------------
    def _targets(self, logits: jax.Array, ignore: jax.Array):
        """Pseudo-label targets of (B, H, W, C) logits: ({'label', 'weight', 'ignore'}, reliable).

        float32 softmax under stop_gradient; label (B, H, W) int32, weight (B, H, W) float32,
        reliable (B, H, W) bool.
        """
        probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
        o = self.opts
        weight, reliable = pseudo_labels.select(
            probs, ignore != IGNORE_INDEX, selector=o.selector, alpha=o.alpha,
            variance_scaling=o.variance_scaling, eps=o.eps, tau=o.tau)
        label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        return {"label": label, "weight": weight, "ignore": ignore}, reliable

    def _unlabeled_loss(self, logits: jax.Array, targets: Mapping[str, jax.Array]) -> jax.Array:
        """Weighted CE over the valid-pixel count, per loss group (docs/methods/csl.md §7)."""
        return losses.weighted_unlabeled_ce(logits, targets["label"], targets["weight"], targets["ignore"],
                                            group_size=self.config.loss.group_size)

    def _train_pass(self, params, batch_stats, images, ctx: StepContext, sample_ids, feature_perturb=False):
        """Student pass with train-mode BN: (outputs, running statistics after this pass)."""
        out, state = self.model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, feature_perturb=feature_perturb,
            sample_ids=sample_ids, rngs={"dropout": ctx.rng}, mutable=["batch_stats"])
        return out, state["batch_stats"]

    def _mix_pass_online(self, params, ctx: StepContext, images, sample_ids):
        """No-grad student logits of the mix batch: batch statistics (discarded) or running ones."""
        variables = {"params": jax.lax.stop_gradient(params), "batch_stats": ctx.batch_stats}
        if self.opts.mix_pass_bn == "eval":
            return self.model.apply(variables, images, train=False)
        logits, _ = self._train_pass(variables["params"], ctx.batch_stats, images, ctx, sample_ids)
        return jax.lax.stop_gradient(logits)

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, params, ctx: StepContext, batch):
        """Per-device loss of one semi-supervised step and aux ({'batch_stats', 'metrics'})."""
        o = self.opts
        lab, unl, mix = batch["labeled"], batch["unlabeled"], batch["mix"]
        n_lab, n_unl = lab["image"].shape[0], unl["weak"].shape[0]
        devices = jax.lax.psum(1, AXIS)
        # Global sample ids, distinct per stream: labeled | weak | strong | second | mix.
        offsets = [0] + [devices * (n_lab + k * n_unl) for k in range(4)]
        ids = [global_sample_ids(ctx, n_lab if k == 0 else n_unl, off) for k, off in enumerate(offsets)]

        # 1. pseudo-labels from the EMA teacher (both batches in one inference call)
        if o.teacher == "ema":
            t_logits = self.model.apply(ctx.extra["teacher"], jnp.concatenate([unl["weak"], mix["weak"]]), train=False)
            main_t, reliable = self._targets(t_logits[:n_unl], unl["ignore"])
            mix_t, _ = self._targets(t_logits[n_unl:], mix["ignore"])
        else:
            mix_t, _ = self._targets(self._mix_pass_online(params, ctx, mix["weak"], ids[4]), mix["ignore"])

        # 2. student main pass [x; u_w], updates the running statistics
        main_in = jnp.concatenate([lab["image"], unl["weak"]])
        main_ids = jnp.concatenate(ids[:2])
        if o.use_fp:
            (logits, logits_fp), stats = self._train_pass(params, ctx.batch_stats, main_in, ctx, main_ids, True)
        else:
            logits, stats = self._train_pass(params, ctx.batch_stats, main_in, ctx, main_ids)
        if o.teacher == "online":
            main_t, reliable = self._targets(logits[n_lab:], unl["ignore"])

        # 3. strong views and their targets
        strong = [views.cutmix(unl["cutmix_box"], mix["strong"], unl["strong"])]
        targets = [views.cutmix(unl["cutmix_box"], mix_t, main_t)]
        if o.second_view == "tmp":
            strong.append(views.trusted_mask(unl["tmp"], reliable, unl["block_mask"]))
            targets.append(main_t)
        elif o.second_view == "cutmix":
            strong.append(views.cutmix(unl["cutmix_box2"], mix["strong2"], unl["strong2"]))
            targets.append(views.cutmix(unl["cutmix_box2"], mix_t, main_t))
        strong_logits, strong_stats = self._train_pass(
            params, stats, jnp.concatenate(strong), ctx, jnp.concatenate(ids[2:2 + len(strong)]))
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
            metrics["loss_fp"] = self._unlabeled_loss(logits_fp[n_lab:], main_t)
            unlabeled = unlabeled + 0.5 * metrics["loss_fp"]
        loss = (metrics["loss_x"] + unlabeled) / 2
        metrics["loss"] = loss
        metrics.update(pseudo_label_metrics(main_t["label"], main_t["weight"], reliable, unl["ignore"], unl["label"],
                                            axis_name=AXIS))
        return loss, {"batch_stats": stats, "metrics": metrics}

    # -- plots -------------------------------------------------------------------------------------
    def diagnostics(self, params, batch_stats, extra, unlabeled: Mapping[str, jax.Array]) -> dict:
        """What the pseudo-label plots need, for a few unlabeled images (outside shard_map).

        The evaluated model (`eval_variables`: the EMA teacher, or the student for
        teacher='online', whose in-step pseudo-labels use train-mode BN instead) predicts the
        weak views in inference mode.

        Args:
          unlabeled: {'weak' (B, H, W, 3) float32, 'ignore' (B, H, W) int32, 'label' (B, H, W)
            int32 (255 where unknown); optional 'tmp' (B, H, W, 3) and 'block_mask' (B, H, W) bool}.
        Returns:
          dict of arrays: weak (B, H, W, 3); conf, var (B, H, W) float32 CSL reliability features;
          cluster_means (B, 2, 2) float32 [image, cluster, (conf, var)] of the CSL split;
          pseudo_label (B, H, W) int32; weight (B, H, W) float32; reliable, valid, correct (B, H, W)
          bool (correct: pseudo-label equals a known label); and 'tmp' (B, H, W, 3), the TMP view
          after trusted masking, when the input has a TMP view.
        """
        logits = self.model.apply(self.eval_variables(params, batch_stats, extra), unlabeled["weak"], train=False)
        targets, reliable = self._targets(logits, unlabeled["ignore"])
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        valid = unlabeled["ignore"] != IGNORE_INDEX
        stats = pseudo_labels.csl_statistics(probs, valid, self.opts.variance_scaling)
        out = {
            "weak": unlabeled["weak"],
            "conf": stats.conf,
            "var": stats.var,
            "cluster_means": stats.mean,
            "pseudo_label": targets["label"],
            "weight": targets["weight"],
            "reliable": reliable,
            "valid": valid,
            "correct": valid & (unlabeled["label"] != IGNORE_INDEX) & (targets["label"] == unlabeled["label"]),
        }
        if "tmp" in unlabeled:
            out["tmp"] = views.trusted_mask(unlabeled["tmp"], reliable, unlabeled["block_mask"])
        return out

    def plot_diagnostics(self, state, batch: Mapping[str, Mapping[str, jax.Array]], plot_dir: str, step: int,
                         palette: np.ndarray) -> None:
        """Writes the pseudo-label panel and the confidence space of a few unlabeled images.

        Called by the evaluation loop (process 0) with the train state and the last train batch.
        Files: `pseudo_labels_step{step:07d}.png` (weak view, pseudo-label, weight map, TMP-masked
        view or the weak view again without TMP) for `config.eval.num_plot_images` images, and
        `confidence_step{step:07d}.png` for the first one (its valid pixels with a ground truth,
        or all valid pixels when it has none, which are then drawn as wrong).
        """
        from csl_jax import visualize  # matplotlib only when plotting

        keys = ("weak", "ignore", "label", "tmp", "block_mask")
        unl = {k: _local_rows(v, max(1, self.config.eval.num_plot_images))
               for k, v in batch["unlabeled"].items() if k in keys}
        if not hasattr(self, "_diagnostics_fn"):
            self._diagnostics_fn = jax.jit(self.diagnostics)
        d = jax.device_get(self._diagnostics_fn(state.params, state.batch_stats, state.extra, unl))
        labels = np.where(d["valid"], d["pseudo_label"], IGNORE_INDEX)
        visualize.pseudo_label_panel(d["weak"], labels, d["weight"], d.get("tmp", d["weak"]),
                                     os.path.join(plot_dir, f"pseudo_labels_step{step:07d}.png"), palette)
        known = d["valid"][0] & (unl["label"][0] != IGNORE_INDEX)
        keep = known if known.any() else d["valid"][0]
        visualize.confidence_space_plot(
            d["conf"][0][keep], d["var"][0][keep], d["correct"][0][keep], d["reliable"][0][keep],
            d["weight"][0][keep], os.path.join(plot_dir, f"confidence_step{step:07d}.png"),
            cluster_means=d["cluster_means"][0])


def _local_rows(x, n: int) -> np.ndarray:
    """The first `n` rows this process holds of a (possibly sharded global) array, as NumPy."""
    shards = getattr(x, "addressable_shards", None)
    if shards is None:
        return np.asarray(x)[:n]
    shards = sorted(shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])[:n]


METHODS = {"csl": SemiSupervised, "unimatch": SemiSupervised, "fixmatch": SemiSupervised}
