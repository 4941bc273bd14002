"""Optimiser: SGD with momentum or AdamW, torch-style weight decay, poly schedule, parameter groups.

The method labels every parameter (`Method.param_labels`, default `param_groups`); the trainer
passes that function to `make_optimizer`. Groups:

    'backbone'          trains at lr
    'head'              trains at lr * lr_multi
    'frozen'            never updated (optax.set_to_zero: bit-identical, no weight decay, no optimiser
                        state), e.g. an encoder locked by the method (UniMatch V2 `lock_backbone`); the
                        method should also `jax.lax.stop_gradient` them in its loss so that their
                        backward pass is not computed
    'no_grad'           the same, for parameters that the torch reference has but never updates
                        (they get no gradient there, so torch neither steps nor decays them)

Config keys read from `config.optim`:

    name                'sgd' (default) | 'adamw'
    lr, lr_multi        'backbone' trains at lr, 'head' at lr * lr_multi
    momentum, nesterov  SGD only: torch.optim.SGD semantics (dampening 0)
    weight_decay        SGD: added to the gradient before the momentum buffer (torch), g + wd * theta.
                        AdamW: decoupled as torch.optim.AdamW, theta <- theta * (1 - lr * wd) before
                        the Adam step, i.e. -lr * (adam + wd * theta) (optax.adamw); betas (0.9, 0.999)
                        and eps 1e-8 (torch's defaults, `ADAMW_BETAS`, `ADAMW_EPS`)
    weight_decay_on     'all' (default) | 'kernels': decay only leaves named `kernel` (conv and
                        linear weights), not BN scale/bias nor conv biases (CPCL's `group_weight`)
    poly_power          lr_t = base * (1 - t / T)^power, step t (from 0) runs at lr_t
    min_lr              lr floor (default 0.0 = none): lr_t = max(base * (1 - t / T)^power, min_lr)
                        in every group, the same absolute floor for 'backbone' and 'head' (CSS)
    lr_after_step       False (default): step t runs at lr_t. True: the lr is set after each step
                        from that step's index (UniMatch, FixMatch, its supervised baseline, CCVC),
                        so step 0 runs at lr_0 = base and step t >= 1 at lr_{t-1}; this is the
                        one-step poly offset of UniMatch V2 too (its spec's `poly_offset=1`)

`name`, `weight_decay_on`, `min_lr` and `lr_after_step` may be absent from older configs; they default
to 'sgd', 'all', 0.0 and False (`LATER_FIELDS`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from csl_jax.constants import PyTree

LabelFn = Callable[[PyTree], PyTree]

#: the trained parameter groups, their lr relative to `lr`, and their key in the logged metrics.
GROUPS = ("backbone", "head")
#: the groups that are never updated (their updates are zeros).
UNTRAINED = ("frozen", "no_grad")
#: `config.optim` fields added after the first release -> the value that reproduces older runs.
LATER_FIELDS = {"name": "sgd", "weight_decay_on": "all", "min_lr": 0.0, "lr_after_step": False}
_LOG_KEYS = {"backbone": "lr", "head": "lr_head"}
WEIGHT_DECAY_ON = ("all", "kernels")
OPTIMIZERS = ("sgd", "adamw")
#: torch.optim.AdamW's defaults, which UniMatch V2 keeps.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


def _key_name(entry) -> Any:
    """The name of one pytree path entry (a dict key, an attribute name or a sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def param_groups(params: PyTree) -> PyTree:
    """Default labels: 'backbone' for a leaf under any module named `backbone`, else 'head'.

    Any depth counts, so `{'branch1': {'backbone': ...}, 'branch2': {'backbone': ...}}` (two-network
    methods: CCVC, CPCL) puts both backbones in 'backbone'. Returns a pytree of str with the
    structure of `params`; it only looks at paths, so it works on updates as well.
    """

    def label(path, _):
        modules = [_key_name(entry) for entry in path[:-1]]
        return "backbone" if "backbone" in modules else "head"

    return jax.tree_util.tree_map_with_path(label, params)


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9, min_lr: float = 0.0,
                  lr_after_step: bool = False) -> optax.Schedule:
    """Optimizer step count t -> lr_t = max(base_lr * (1 - t / T)^power, min_lr), or lr_{max(t-1, 0)}
    with `lr_after_step` (the torch loops that set the lr after step t from index t, so that step 0
    runs at base_lr and step t >= 1 at lr_{t-1}: UniMatch `unimatch.py`, `supervised.py`; CCVC).

    The floor is CSS's `PolyLR(optimizer, total_iter, min_lr=1e-4)`
    (`generalframeworks/scheduler/my_lr_scheduler.py`): `max(base_lr * (1 - t/T)^power, min_lr)`
    for every torch param group's own `base_lr`, i.e. a clamp of the ordinary poly curve, not a
    poly that decays towards `min_lr`, and the same absolute floor whatever the group's base lr.
    After T steps optax's poly stays at 0, so the clamped lr stays at `min_lr` (as CSS's does).
    With `min_lr <= 0` and no `lr_after_step` the schedule is optax's polynomial schedule unchanged.
    """
    poly = optax.polynomial_schedule(init_value=base_lr, end_value=0.0, power=power, transition_steps=total_steps)
    floored = poly if min_lr <= 0.0 else (lambda count: jnp.maximum(poly(count), min_lr))
    if not lr_after_step:
        return floored
    return lambda count: floored(jnp.maximum(count - 1, 0))


def group_schedules(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> dict[str, optax.Schedule]:
    """{'backbone': lr schedule, 'head': lr schedule}: base lr and lr * lr_multi, the same poly, floor
    and indexing (`lr_after_step`)."""
    min_lr = float(optim_cfg.get("min_lr", LATER_FIELDS["min_lr"]))
    after = bool(optim_cfg.get("lr_after_step", LATER_FIELDS["lr_after_step"]))
    base = {"backbone": optim_cfg.lr, "head": optim_cfg.lr * optim_cfg.lr_multi}
    return {g: poly_schedule(base[g], total_steps, optim_cfg.poly_power, min_lr, after) for g in GROUPS}


def is_kernel(path) -> bool:
    """Whether a param path ends in a leaf named `kernel` (Flax conv / dense weights)."""
    return bool(path) and _key_name(path[-1]) == "kernel"


def decayed_weights(weight_decay: float, decay_on: str = "all") -> optax.GradientTransformation:
    """g -> g + weight_decay * theta on all leaves ('all') or only on `kernel` leaves ('kernels').

    Chained before the momentum trace, this is torch SGD's weight decay; between the Adam scaling and
    the lr, AdamW's decoupled one. The state is optax's EmptyState in both modes, so the optimizer
    state has the same structure either way.
    """
    if decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"config.optim.weight_decay_on must be one of {WEIGHT_DECAY_ON}, got {decay_on!r}")
    if decay_on == "all":
        return optax.add_decayed_weights(weight_decay)

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("decayed_weights needs the params: call update(updates, state, params).")
        updates = jax.tree_util.tree_map_with_path(
            lambda path, g, p: g + weight_decay * p if is_kernel(path) else g, updates, params)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _checked(param_labels: LabelFn) -> LabelFn:
    def labels(tree):
        out = param_labels(tree)
        unknown = set(jax.tree.leaves(out)) - set(GROUPS + UNTRAINED)
        if unknown:
            raise ValueError(f"param_labels returned unknown group(s) {sorted(unknown)}; "
                             f"valid: {list(GROUPS + UNTRAINED)}")
        return out

    return labels


def _trained(optim_cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """One trained group's transformation: torch SGD or torch AdamW at `schedule`, weight decay included."""
    name = optim_cfg.get("name", LATER_FIELDS["name"])
    decay = decayed_weights(optim_cfg.weight_decay, optim_cfg.get("weight_decay_on", LATER_FIELDS["weight_decay_on"]))
    if name == "sgd":
        return optax.chain(decay, optax.sgd(schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov))
    if name == "adamw":  # optax.adamw's chain, with `decay` honouring weight_decay_on
        return optax.chain(optax.scale_by_adam(*ADAMW_BETAS, eps=ADAMW_EPS), decay,
                           optax.scale_by_learning_rate(schedule))
    raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {name!r}")


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int,
                   param_labels: LabelFn = param_groups) -> optax.GradientTransformation:
    """Per-group SGD (momentum, optional Nesterov; g + wd * theta enters the momentum buffer, as torch)
    or AdamW (torch's decoupled decay), on the poly schedule.

    Args:
      optim_cfg: `config.optim` (see the module docstring; the `LATER_FIELDS` are optional).
      total_steps: T of the poly schedule.
      param_labels: params (or updates) -> pytree of 'backbone' / 'head' / 'frozen' / 'no_grad' with
        their structure; the trainer passes `method.param_labels`. 'backbone' trains at `lr`, 'head'
        at `lr * lr_multi`, both on the poly schedule with the `min_lr` floor; 'frozen' and 'no_grad'
        get zero updates.

    The untrained groups enter the optax.multi_transform only when the labels use them, so a model
    without them keeps the optimizer state structure it always had (checkpoints of older runs).
    """
    schedules = group_schedules(optim_cfg, total_steps)
    trained = {g: _trained(optim_cfg, schedules[g]) for g in GROUPS}
    labels = _checked(param_labels)

    def partition(tree) -> optax.GradientTransformation:
        used = set(jax.tree.leaves(labels(tree)))
        return optax.multi_transform({**trained, **{g: optax.set_to_zero() for g in UNTRAINED if g in used}}, labels)

    return optax.GradientTransformation(
        lambda params: partition(params).init(params),
        lambda updates, state, params=None: partition(updates).update(updates, state, params))


def learning_rates(optim_cfg: ml_collections.ConfigDict, total_steps: int, step: jax.Array) -> dict:
    """{'lr': backbone lr, 'lr_head': head lr} that step `step` (from 0) runs at, floor and
    `lr_after_step` included, for logging."""
    return {_LOG_KEYS[g]: schedule(step) for g, schedule in group_schedules(optim_cfg, total_steps).items()}
