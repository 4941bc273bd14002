"""CPCL: conservative-progressive collaborative learning (IEEE TIP 2023), docs/methods/cpcl.md.

Two networks f1, f2 (`csl_jax.models.cpcl.CPCLNet`, nothing shared) and three streams: labeled
(x, y), unlabeled u0 with its 3-box mask M ('cpcl_mask' view), and 'mix' u1 (an independent
shuffle of the unlabeled list). One step, per device (spec §3); every pass is in train mode and
chains the branch's BN statistics x -> u0 -> u1 -> x_mix:

    L_sup  = l(f1(x), y) + l(f2(x), y)                              (config.loss.labeled: ce | ohem_weighted)
    Zk     = where(M, f_k(u1), f_k(u0)) without gradient;  yk = argmax Zk
    N      = confusion(y1, y2) over the whole batch (psum) + I;  w = class-wise disagreement rate
    y_inter = y1 where y1 == y2 else 255;  y_union = y1 where agree or w[y1] > w[y2], else y2
    ck     = confidence of Zk ('pixel': max class probability per pixel; 'first_commit': a scalar)
    L_inter = CE(f1(x_mix), y_inter) weighted by (c1 + c2) / 2                (branch 1: conservative)
    L_union = CE(f2(x_mix), y_union) weighted by (c1 + c2) / 2 | c1 | c2     (branch 2: progressive)
    L      = L_sup + unsup_weight (L_inter + L_union)

x_mix = where(M, u1, u0). The defaults are leofansq/CPCL at HEAD (f0e1800; exp_*/train.py as of
c1a3cef): per-pixel confidence and both unlabeled losses averaged over all pixels ('pixel_mean').
The first commit 0bf0c50 is `confidence='first_commit'` and, for its exp_voc,
`unsup_reduction='valid_mean'` (`cpcl_losses`). Predict functions: 'branch1' (what CPCL evaluates;
picks the best checkpoint) and 'branch2', both on the two-branch variables (the official
checkpoints hold both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.config_checks import is_number
from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import StreamSpec
from csl_jax.methods.base import Method, StepContext, at_least, check_fields, check_network, check_ranges, init_network
from csl_jax.methods.cpcl import data as cpcl_data  # noqa: F401  (registers the 'cpcl' geometry and 'cpcl_mask' view)
from csl_jax.methods.cpcl import losses as cpcl_losses
from csl_jax.methods.parts import passes
from csl_jax.models.cpcl import BRANCHES
from csl_jax.parallel import AXIS

NAME = "cpcl"
_CHOICES = {"confidence": cpcl_losses.CONFIDENCES, "unsup_reduction": cpcl_losses.REDUCTIONS}
LABELED_LOSSES = ("ce", "ohem_weighted")


def default_options() -> ml_collections.ConfigDict:
    """`config.method` of CPCL, the official VOC code at HEAD (f0e1800: exp_voc/train.py, config.py).

    Fields: name; unsup_weight (lambda_u: VOC 1, Cityscapes 5); confidence ('pixel': per-pixel max
    class probability, HEAD and the paper | 'first_commit': 0bf0c50's scalar max of the
    width-softmax; 'reference' is its former name, an alias kept for saved configs); unsup_reduction
    ('pixel_mean': HEAD, both datasets | 'valid_mean': 0bf0c50's exp_voc); mask_padding (drop crop
    padding from N and both unlabeled losses; False = the reference, which counts it); class_weights
    (OHEM class weights, used with config.loss.labeled='ohem_weighted'; () = all 1).
    """
    return ml_collections.ConfigDict(dict(name=NAME, unsup_weight=1.0, confidence="pixel",
                                          unsup_reduction="pixel_mean", mask_padding=False, class_weights=()))


def configure(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Makes `c` a CPCL config: `default_options()`, the 'cpcl' network with CPCL's backbone (deep stem,
    floor max-pool, layer4 without stride dilated 2/4/8 = OS16 + multi-grid, R50), one lr for every
    parameter, weight decay on conv kernels only. Returns `c`."""
    c.method = default_options()
    c.model.update(name=NAME, depth=50, stem="deep", output_stride=16, multi_grid=True, maxpool_ceil=False,
                   aspp_rates=(6, 12, 18))
    c.optim.update(lr_multi=1.0, weight_decay=1e-4, weight_decay_on="kernels", momentum=0.9, nesterov=False,
                   poly_power=0.9)
    return c


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing or invalid."""
    check_fields(opts, default_options(), "cpcl", _CHOICES)
    check_ranges(opts, option_ranges(opts))


def option_ranges(opts: ml_collections.ConfigDict) -> dict:
    """The valid values of the numeric `config.method` fields: key -> (predicate, what is valid); the
    length of class_weights (the class count) is checked when the method is built."""
    del opts  # no range depends on another field
    return {"unsup_weight": at_least(0),
            "class_weights": (lambda v: isinstance(v, tuple) and all(is_number(w) and w > 0 for w in v),
                              "a tuple of numbers > 0, one per class (() = all 1)")}


class CPCL(Method):
    """CPCL (module docstring). params and state['batch_stats'] are {'branch1', 'branch2'}."""

    epoch_stream = "unlabeled"
    best_predict = "branch1"

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        check_options(config.method)
        check_network(config, NAME)
        if config.loss.labeled not in LABELED_LOSSES:
            raise ValueError(f"config.loss.labeled={config.loss.labeled!r}; CPCL expects one of {LABELED_LOSSES}")
        weights = tuple(config.method.class_weights)
        if weights and len(weights) != num_classes:
            raise ValueError(f"config.method.class_weights has {len(weights)} values for {num_classes} classes")
        super().__init__(config, num_classes)
        self.opts = config.method
        self.class_weights = weights or (1.0,) * num_classes

    # -- networks, state, streams ----------------------------------------------------------------
    def init(self, rng, image_shape):
        """Each branch from `init_network` with its own key: both backbones from `model.init_from` when set
        (the same file), the heads drawn independently (the only difference between the branches)."""
        nets = {name: init_network(getattr(self.model, name), self.config.model, key, image_shape)
                for name, key in zip(BRANCHES, jax.random.split(rng))}
        return ({name: nets[name]["params"] for name in BRANCHES},
                {"batch_stats": {name: nets[name]["batch_stats"] for name in BRANCHES}})

    def streams(self):
        return {"labeled": StreamSpec(source="labeled", batch="labeled", epoch_of="unlabeled", geometry="cpcl"),
                "unlabeled": StreamSpec(source="unlabeled", batch="unlabeled", views=("cpcl_mask",),
                                        geometry="cpcl"),
                "mix": StreamSpec(source="unlabeled", batch="unlabeled", geometry="cpcl")}

    # -- evaluation ------------------------------------------------------------------------------
    def predict_fns(self):
        """'branch1' and 'branch2': one branch's eval-mode logits, read from the two-branch variables."""
        return {name: passes.branch_predict(self.model, name) for name in BRANCHES}

    def eval_variables(self, train_state, name):
        self._check_predict_name(name)
        return {"params": train_state.params, "batch_stats": train_state.state["batch_stats"]}

    # -- loss ------------------------------------------------------------------------------------
    def _supervised(self, logits, labels, ctx: StepContext):
        cfg = self.config.loss
        if cfg.labeled == "ce":
            return self.labeled_loss(logits, labels)
        return cpcl_losses.weighted_ohem_loss(logits, labels, class_weights=self.class_weights,
                                              group_size=cfg.group_size, thresh=cfg.ohem_thresh,
                                              min_kept=cfg.ohem_min_kept, num_devices=ctx.num_devices,
                                              axis_name=AXIS)

    def _branch_passes(self, name, params, stats, inputs, ctx: StepContext, ids):
        """The four train-mode passes of one branch, BN statistics chained: (logits by input, statistics)."""
        net, out = getattr(self.model, name), {}
        for key, images in inputs.items():
            teacher = key in ("u0", "u1")
            p = jax.lax.stop_gradient(params) if teacher else params
            (logits, _), stats = passes.train_pass(net, p, stats, images, rng=ctx.rng, sample_ids=ids[key])
            out[key] = jax.lax.stop_gradient(logits) if teacher else logits
        return out, stats

    def loss(self, params, state, batch, ctx: StepContext):
        """Per-device loss of one CPCL step, (new state, metrics)."""
        o, c = self.opts, self.num_classes
        lab, unl, mix = batch["labeled"], batch["unlabeled"], batch["mix"]
        mask = unl["cpcl_mask"]
        box = mask[..., None]
        inputs = {"x": lab["image"], "u0": unl["weak"], "u1": mix["weak"], "x_mix": jnp.where(box, mix["weak"],
                                                                                              unl["weak"])}
        ids = {"x": ctx.sample_ids("labeled", lab["image"].shape[0]),
               "u0": ctx.sample_ids("unlabeled", unl["weak"].shape[0]),
               "u1": ctx.sample_ids("mix", mix["weak"].shape[0])}
        ids["x_mix"] = ids["u0"]
        out, stats = {}, {}
        for name in BRANCHES:
            out[name], stats[name] = self._branch_passes(name, params[name], state["batch_stats"][name], inputs, ctx,
                                                         ids)

        teacher = [jnp.where(box, out[b]["u1"], out[b]["u0"]) for b in BRANCHES]
        y1, y2 = (jnp.argmax(z, axis=-1).astype(jnp.int32) for z in teacher)
        counted = None
        if o.mask_padding:
            counted = jnp.where(mask, mix["ignore"], unl["ignore"]) != IGNORE_INDEX
        confusion = cpcl_losses.pair_confusion(y1, y2, c, counted, axis_name=AXIS)
        targets = cpcl_losses.pseudo_labels(y1, y2, cpcl_losses.disagreement_weights(confusion))
        c1, c2 = (cpcl_losses.confidence(z, o.confidence, axis_name=AXIS) for z in teacher)
        w_inter, w_union = cpcl_losses.loss_weights(c1, c2, targets["agree"], targets["pick1"])
        y_inter, y_union = targets["inter"], targets["union"]
        if counted is not None:
            y_inter, y_union = (jnp.where(counted, y, IGNORE_INDEX) for y in (y_inter, y_union))

        def unsup(logits, labels, weights):
            return cpcl_losses.unlabeled_loss(logits, labels, weights, reduction=o.unsup_reduction,
                                              group_size=self.config.loss.group_size, axis_name=AXIS)

        metrics = {"loss_sup": sum(self._supervised(out[b]["x"], lab["label"], ctx) for b in BRANCHES),
                   "loss_inter": unsup(out["branch1"]["x_mix"], y_inter, w_inter),
                   "loss_union": unsup(out["branch2"]["x_mix"], y_union, w_union)}
        loss = metrics["loss_sup"] + o.unsup_weight * (metrics["loss_inter"] + metrics["loss_union"])
        metrics["loss"] = loss
        metrics.update(self._agreement_metrics(confusion, c1, c2, w_union))
        return loss, (dict(state, batch_stats=stats), metrics)

    @staticmethod
    def _agreement_metrics(confusion, c1, c2, w_union) -> dict:
        """overlap: trace(N) / sum(N) with the +I (the reference's log); agree_ratio: the same without
        it; conf1, conf2: mean confidences; weight_union: mean union weight. Global float32 scalars."""
        eye = jnp.eye(confusion.shape[0], dtype=confusion.dtype)
        raw = confusion - eye

        def mean(x):
            return jax.lax.pmean(jnp.mean(x), AXIS)

        return {"overlap": jnp.trace(confusion) / jnp.sum(confusion),
                "agree_ratio": jnp.trace(raw) / jnp.maximum(jnp.sum(raw), 1.0),
                "conf1": mean(c1), "conf2": mean(c2), "weight_union": mean(w_union)}


__all__ = ["CPCL", "NAME", "check_options", "configure", "default_options"]
