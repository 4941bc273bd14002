"""CCVC: conflict-based cross-view consistency with two branches (docs/methods/ccvc.md).

One iteration, per device (spec §3), both branches on every input (`csl_jax.models.ccvc.CCVCNet`):

1. labeled pass, train mode: (f_x, z_x) per branch; updates the running BN statistics;
2. eval-mode pass on u_w with the statistics just updated, no gradient: Z1, Z2, yk = argmax Zk;
3. mixed pass, train mode, on u~ = where(box, rev(u_s), u_s), rev = reversal inside groups of
   `mix_group` samples (the official per-GPU `flip(0)`); targets and ign mixed likewise;
4. raw pass, train mode, on u_w ("raw" view).
BN statistics chain 1 -> 3 -> 4 (three updates per step). Then

    L_CE  = w_ce (l(z1_x, y) + l(z2_x, y)) / 2                       (config.loss.labeled: ce | ohem)
    con_k = sum w_k CE(z_k'_m, yk_m) [ign_m valid] / #valid             (k' the other branch)
    raw_k = sum w_k(raw) CE(z_k'_r, argmax sg z_k_r) [ign valid] / #valid
    L_con = w_con (con_1 + con_2 + raw_1 + raw_2) / 4
    L_dis = w_dis (d(f_x) + (d(f_m) + d(f_r)) / 2) / 2                 (ccvc_losses.discrepancy)
    L     = L_CE + L_con + L_dis

w_k = w_confident on conflicting pixels whose branch-k confidence exceeds tau, else 1
(`ccvc_losses.conflict_weights`). For con_k the weights come from the un-mixed Z1, Z2
(`mask_alignment='reference'`) or from the mixed ones ('mixed'); confidence is the max logit
('logit', reference) or the max softmax ('prob'). Denominators are per loss group
(`config.loss.group_size`, the reference per-GPU batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.config_checks import is_number
from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import StreamSpec
from csl_jax.data.pipeline import REPEATS
from csl_jax.methods.base import (Method, StepContext, at_least, check_fields, check_network, check_ranges,
                                  init_network, with_later_fields, within)
from csl_jax.methods.ccvc import losses as ccvc_losses
from csl_jax.methods.parts import losses as shared_losses
from csl_jax.methods.parts import passes, views
from csl_jax.models.ccvc import BRANCHES
from csl_jax.parallel import AXIS

_CHOICES = {"confidence": ccvc_losses.CONFIDENCES, "mask_alignment": ("reference", "mixed"), "labeled_repeat": REPEATS}
#: The reference softmax confidence behind the logged "Mask" ratio (a diagnostic only).
MASK_RATIO_THRESHOLD = 0.95
#: fold_in index of each train-mode pass, so the mapping's Dropout2d masks differ between passes.
_PASS_KEYS = {"labeled": 0, "mixed": 1, "raw": 2}


def default_options() -> ml_collections.ConfigDict:
    """`config.method` of CCVC with the official `CCVC_aug.py` defaults (the Pascal recipe).

    Fields: name; w_ce, w_con, w_dis (loss weights); w_confident (weight of confident conflicting
    pseudo-labels); tau (`conf_threshold`); confidence ('logit' | 'prob'); mask_alignment
    ('reference' | 'mixed'); mix_group (CutMix partner = reversal inside groups of this many
    consecutive unlabeled samples: the reference per-GPU batch); labeled_repeat (`StreamSpec.repeat`
    of the labeled list: 'sample', the reference's shuffle-and-cut of the repeated list,
    `dataset/aug_semi2.py` lines 25-28; 'tile' before it existed).
    """
    return ml_collections.ConfigDict(dict(
        name="ccvc", w_ce=5.0, w_con=2.0, w_dis=1.0, w_confident=1.5, tau=0.9, confidence="logit",
        mask_alignment="reference", mix_group=4, labeled_repeat="sample"))


#: fields added after CCVC's first release, with the values older saved configs meant.
LATER_FIELDS = {"labeled_repeat": "tile"}


def configure(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a config into a CCVC one: the 'ccvc' model, `default_options()`, CutMix box always on,
    the lr set after each step (`CCVC_aug.py` sets the poly lr after `optimizer.step()`)."""
    c.model.name = "ccvc"
    c.method = default_options()
    c.data.cutmix_prob = 1.0
    c.optim.lr_after_step = True
    return c


def check_options(opts: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.method` field that is missing or invalid."""
    check_fields(with_later_fields(opts, LATER_FIELDS), default_options(), "ccvc", _CHOICES)
    check_ranges(opts, option_ranges(opts))


def option_ranges(opts: ml_collections.ConfigDict) -> dict:
    """The valid values of the numeric `config.method` fields: key -> (predicate, what is valid). tau is
    a raw logit with confidence='logit' (any number), a probability with 'prob'."""
    tau = ((within(0.0, 1.0)[0], "in [0, 1] with confidence='prob'") if opts.confidence == "prob"
           else (is_number, "a number (a logit threshold with confidence='logit')"))
    return {"w_ce": at_least(0), "w_con": at_least(0), "w_dis": at_least(0), "w_confident": at_least(0), "tau": tau,
            "mix_group": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")}


class CCVC(Method):
    """CCVC (see the module docstring). params and state['batch_stats'] are {'branch1', 'branch2'}.

    Streams: 'labeled' (epochs of |U| samples) and 'unlabeled' (weak, ignore, strong, cutmix_box);
    an epoch is one pass over the unlabeled images. Predict functions: 'branch1', 'branch2' and
    'average' (logits (z1 + z2) / 2, picks the best checkpoint); each reads the whole two-branch
    variables, as the official best checkpoints hold both branches.
    """

    epoch_stream = "unlabeled"
    best_predict = "average"
    later_fields = LATER_FIELDS

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        check_options(config.method)
        super().__init__(config, num_classes)
        check_network(config, "ccvc")
        self.opts = with_later_fields(config.method, LATER_FIELDS)

    # -- networks, state, streams ----------------------------------------------------------------
    def init(self, rng, image_shape):
        """Each branch from `init_network` with its own key: both backbones from `model.init_from`
        when set (the same file), the rest drawn independently."""
        nets = {name: init_network(getattr(self.model, name), self.config.model, key, image_shape)
                for name, key in zip(BRANCHES, jax.random.split(rng))}
        return ({name: nets[name]["params"] for name in BRANCHES},
                {"batch_stats": {name: nets[name]["batch_stats"] for name in BRANCHES}})

    def streams(self):
        return {"labeled": StreamSpec(source="labeled", batch="labeled", epoch_of="unlabeled",
                                      repeat=self.opts.labeled_repeat),
                "unlabeled": StreamSpec(source="unlabeled", batch="unlabeled", views=("strong",))}

    # -- evaluation ------------------------------------------------------------------------------
    def predict_fns(self):
        """'branch1', 'branch2' (one branch alone) and 'average' ((z1 + z2) / 2), on the two-branch variables."""
        return {"branch1": passes.branch_predict(self.model, "branch1"),
                "branch2": passes.branch_predict(self.model, "branch2"), "average": self._predict}

    def eval_variables(self, train_state, name):
        self._check_predict_name(name)
        return {"params": train_state.params, "batch_stats": train_state.state["batch_stats"]}

    # -- loss ------------------------------------------------------------------------------------
    def _train_pass(self, params, stats, images, ctx: StepContext, pass_name: str, ids):
        (_, out), stats = passes.train_pass(self.model, params, stats, images,
                                            rng=jax.random.fold_in(ctx.rng, _PASS_KEYS[pass_name]), sample_ids=ids)
        return out, stats

    def _pair_loss(self, out, labels, weights, ignore):
        """(loss teaching branch 2 with branch 1's labels, loss teaching branch 1 with branch 2's)."""
        def ce(logits, k):
            return shared_losses.weighted_unlabeled_ce(logits, labels[k], weights[k], ignore,
                                                       group_size=self.config.loss.group_size, axis_name=AXIS)

        return ce(out["logits_branch2"], 0), ce(out["logits_branch1"], 1)

    def _weights(self, z1, z2):
        o = self.opts
        return ccvc_losses.conflict_weights(z1, z2, tau=o.tau, w_confident=o.w_confident, kind=o.confidence)

    def loss(self, params, state, batch, ctx: StepContext):
        """Per-device loss of one CCVC step, (new state, metrics)."""
        o = self.opts
        lab, unl = batch["labeled"], batch["unlabeled"]
        n_lab, n_unl = lab["image"].shape[0], unl["weak"].shape[0]
        lab_ids, unl_ids = ctx.sample_ids("labeled", n_lab), ctx.sample_ids("unlabeled", n_unl)

        # 1. labeled pass
        out_x, stats = self._train_pass(params, state["batch_stats"], lab["image"], ctx, "labeled", lab_ids)
        # 2. eval-mode pseudo-labels with the statistics updated by pass 1
        _, out_w = self.model.apply(jax.lax.stop_gradient({"params": params, "batch_stats": stats}), unl["weak"],
                                    train=False)
        z_w = [jax.lax.stop_gradient(out_w[f"logits_{b}"]) for b in BRANCHES]
        conflict, w1, w2 = self._weights(*z_w)
        unmixed_weights = (w1, w2)

        # 3. mixed pass: partner = reversal inside groups of mix_group samples
        def mix(x):
            return views.cutmix(unl["cutmix_box"], ccvc_losses.reverse_groups(x, o.mix_group, AXIS, ctx.num_devices), x)

        z_m = [mix(z) for z in z_w]
        labels_m = [ccvc_losses.hard_labels(z) for z in z_m]
        ignore_m = mix(unl["ignore"])
        if o.mask_alignment == "mixed":
            _, w1, w2 = self._weights(*z_m)
        out_m, stats = self._train_pass(params, stats, mix(unl["strong"]), ctx, "mixed", unl_ids)

        # 4. raw pass on the weak view
        out_r, stats = self._train_pass(params, stats, unl["weak"], ctx, "raw", unl_ids)
        z_r = [out_r[f"logits_{b}"] for b in BRANCHES]
        conflict_r, w1_r, w2_r = self._weights(*z_r)

        metrics = {}
        metrics["loss_ce"] = o.w_ce * (self.labeled_loss(out_x["logits_branch1"], lab["label"])
                                       + self.labeled_loss(out_x["logits_branch2"], lab["label"])) / 2
        con = self._pair_loss(out_m, labels_m, (w1, w2), ignore_m)
        raw = self._pair_loss(out_r, [ccvc_losses.hard_labels(z) for z in z_r], (w1_r, w2_r), unl["ignore"])
        metrics["loss_con"] = o.w_con * (sum(con) + sum(raw)) / 4

        def dis(out):
            return ccvc_losses.discrepancy(out["features_branch1"], out["features_branch2"])

        metrics["loss_dis"] = o.w_dis * (dis(out_x) + (dis(out_m) + dis(out_r)) / 2) / 2
        loss = metrics["loss_ce"] + metrics["loss_con"] + metrics["loss_dis"]
        metrics["loss"] = loss
        metrics.update(self._conflict_metrics(conflict, unmixed_weights, conflict_r, z_r, unl["ignore"]))
        return loss, (dict(state, batch_stats=stats), metrics)

    def _conflict_metrics(self, conflict, weights, conflict_r, z_r, ignore) -> dict:
        """Global (psum over devices) shares of valid pixels of u_w, float32 scalars.

        conflict_ratio: the branches disagree (eval-mode pass); upweighted_ratio: share of those
        conflicts whose weight (from the eval-mode logits) is w_confident, averaged over the two
        branches; conflict_ratio_raw: disagreement of the raw train-mode pass; mask_ratio: the
        official "Mask", softmax confidence >= 0.95 in the raw pass, averaged over the branches.
        """
        valid = ignore != IGNORE_INDEX
        conf = [ccvc_losses.confidence(z, "prob") >= MASK_RATIO_THRESHOLD for z in z_r]

        def count(mask):
            return jnp.sum(mask, dtype=jnp.float32)

        n = {"valid": count(valid), "conflict": count(conflict & valid),
             "upweighted": sum(count(conflict & valid & (w != 1.0)) for w in weights) / 2,
             "conflict_raw": count(conflict_r & valid), "mask": sum(count(c & valid) for c in conf) / 2}
        n = jax.lax.psum(n, AXIS)

        def ratio(num, den):
            return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)

        return {"conflict_ratio": ratio(n["conflict"], n["valid"]),
                "upweighted_ratio": ratio(n["upweighted"], n["conflict"]),
                "conflict_ratio_raw": ratio(n["conflict_raw"], n["valid"]),
                "mask_ratio": ratio(n["mask"], n["valid"])}
