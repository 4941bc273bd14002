"""csl_jax.optim against a NumPy float64 transcription of torch.optim.SGD and CSS's PolyLR, and
against torch.optim.AdamW itself (float64).

The SGD reference below is written from torch's documented SGD update (momentum, dampening 0,
optional Nesterov, weight decay added to the gradient), one param group per label with its own
lr, and the poly lr max(base * (1 - t/T)^power, min_lr) set before step t, or (lr_after_step)
from index t - 1 after step t - 1 as UniMatch's loop.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from csl_jax import optim
from csl_jax.methods.base import Method

T = 4  # poly length
STEPS = 3


def cfg(**kw):
    c = dict(lr=0.1, lr_multi=10.0, momentum=0.9, nesterov=False, weight_decay=1e-2, poly_power=0.9)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def _module(rng, cin, cout, bias=True):
    m = {"conv": {"kernel": rng.normal(size=(3, 3, cin, cout))}, "bn": {"scale": rng.normal(size=(cout,)),
                                                                        "bias": rng.normal(size=(cout,))}}
    if bias:
        m["conv"]["bias"] = rng.normal(size=(cout,))
    return m


def one_net(rng):
    return {"backbone": {"layer1": _module(rng, 2, 3, bias=False)},
            "aspp": _module(rng, 3, 4),
            "classifier": {"kernel": rng.normal(size=(1, 1, 4, 2)), "bias": rng.normal(size=(2,))},
            "fc": {"kernel": rng.normal(size=(4, 2))}}


def two_nets(rng):
    return {"branch1": one_net(rng), "branch2": {**one_net(rng), "mapping": _module(rng, 4, 4)}}


def flat(tree):
    """{'a/b/c': float64 array} with '/'-joined dict paths."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(p.key for p in path)] = np.asarray(leaf, np.float64)
    return out


def reference_sgd(params, grads_seq, *, lr, lr_multi, momentum, nesterov, weight_decay, poly_power, min_lr=0.0,
                  lr_after_step=False, decayed=lambda name: True,
                  is_backbone=lambda name: "backbone" in name.split("/")[:-1]):
    """torch.optim.SGD.step (float64) with a per-group lr set by PolyLR before each step, or
    (`lr_after_step`) the initial lr at step 0 and the poly lr of index t - 1 at step t."""
    p = flat(params)
    buf = {}
    for t, grads in enumerate(grads_seq):
        g = flat(grads)
        index = max(t - 1, 0) if lr_after_step else t
        for name in p:
            base = lr if is_backbone(name) else lr * lr_multi
            # Past T CSS's PolyLR is undefined (a negative base to 0.9); optax holds the poly at 0.
            lr_t = max(base * (1 - min(index, T) / T) ** poly_power, min_lr)
            d_p = g[name] + weight_decay * p[name] if decayed(name) else g[name]
            if name not in buf:
                buf[name] = d_p.copy()
            else:
                buf[name] = momentum * buf[name] + d_p  # dampening 0
            step = d_p + momentum * buf[name] if nesterov else buf[name]
            p[name] = p[name] - lr_t * step
    return p


def run_optax(tx, params, grads_seq):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    for grads in grads_seq:
        params, state = step(params, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads))
    return flat(params)


def grads_like(params, seed):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(STEPS)]


def assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("make_params", [one_net, two_nets], ids=["one_net", "two_branches"])
def test_default_labels_match_torch_sgd(nesterov, make_params):
    params = make_params(np.random.default_rng(0))
    grads = grads_like(params, 1)
    c = cfg(nesterov=nesterov)
    got = run_optax(optim.make_optimizer(c, T), params, grads)
    want = reference_sgd(params, grads, **c.to_dict())
    assert_close(got, want)
    # The head really moved at lr * lr_multi: the same run with lr_multi = 1 differs there only.
    same = reference_sgd(params, grads, **cfg(nesterov=nesterov, lr_multi=1.0).to_dict())
    assert any(not np.allclose(same[k], want[k]) for k in want if "backbone" not in k)
    assert all(np.allclose(same[k], want[k]) for k in want if "backbone" in k.split("/")[:-1])


def test_param_groups_any_depth():
    labels = optim.param_groups(two_nets(np.random.default_rng(0)))
    assert labels["branch1"]["backbone"]["layer1"]["conv"]["kernel"] == "backbone"
    assert labels["branch2"]["backbone"]["layer1"]["bn"]["scale"] == "backbone"
    assert labels["branch2"]["mapping"]["conv"]["kernel"] == "head"
    assert labels["branch1"]["classifier"]["bias"] == "head"
    # Only module names count, not a leaf that happens to be called `backbone`.
    assert optim.param_groups({"head": {"backbone": 1.0}}) == {"head": {"backbone": "head"}}
    assert optim.param_groups({"backbone": {"w": 1}, "aspp": {"w": 2}}) == {"backbone": {"w": "backbone"},
                                                                           "aspp": {"w": "head"}}


def test_method_labels_reach_the_optimizer():
    """A method's own labels (U2PL-like: only the classifier at lr * lr_multi) drive the groups."""

    class OnlyClassifierIsHead(Method):
        def param_labels(self, params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "head" if path[0].key == "classifier" else "backbone", params)

    params = one_net(np.random.default_rng(0))
    grads = grads_like(params, 2)
    base = Method(ml_collections.ConfigDict({"model": {}}), 2)
    assert base.param_labels(params) == optim.param_groups(params)

    method = OnlyClassifierIsHead(ml_collections.ConfigDict({"model": {}}), 2)
    got = run_optax(optim.make_optimizer(cfg(), T, param_labels=method.param_labels), params, grads)
    want = reference_sgd(params, grads, **cfg().to_dict(), is_backbone=lambda n: not n.startswith("classifier/"))
    assert_close(got, want)

    with pytest.raises(ValueError, match=r"unknown group\(s\) \['decoder'\]"):
        optim.make_optimizer(cfg(), T, param_labels=lambda p: jax.tree.map(lambda _: "decoder", p)).init(params)


@pytest.mark.parametrize("nesterov", [False, True])
def test_weight_decay_on_kernels(nesterov):
    params = two_nets(np.random.default_rng(3))
    grads = grads_like(params, 4)
    c = cfg(nesterov=nesterov, weight_decay=0.05, weight_decay_on="kernels")
    got = run_optax(optim.make_optimizer(c, T), params, grads)
    kw = {k: v for k, v in c.to_dict().items() if k != "weight_decay_on"}
    want = reference_sgd(params, grads, **kw, decayed=lambda name: name.endswith("/kernel"))
    assert_close(got, want)
    # BN scale/bias and conv biases got no decay: they equal a run without any weight decay.
    no_wd = reference_sgd(params, grads, **{**kw, "weight_decay": 0.0})
    for k in want:
        if k.endswith("/kernel"):
            assert not np.allclose(no_wd[k], want[k]), k
        else:
            np.testing.assert_allclose(got[k], no_wd[k], rtol=2e-6, atol=2e-6, err_msg=k)
    # The optimizer state has the same structure as with decay on everything (checkpoints).
    all_tx = optim.make_optimizer(cfg(weight_decay=0.05), T)
    assert (jax.tree.structure(all_tx.init(params)) == jax.tree.structure(optim.make_optimizer(c, T).init(params)))


def test_weight_decay_on_rejects_unknown():
    with pytest.raises(ValueError, match="weight_decay_on must be one of"):
        optim.make_optimizer(cfg(weight_decay_on="weights"), T)


@pytest.mark.parametrize("nesterov", [False, True])
def test_min_lr_floor(nesterov):
    # Backbone poly lr: 0.1, 0.0772, 0.0536, 0.0287 -> the floor 0.06 binds at t = 2 and 3.
    # Head (x10): 1.0 ... 0.287, always above it: the floor is absolute, it does not scale.
    params = two_nets(np.random.default_rng(5))
    rng = np.random.default_rng(6)
    grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(T + 2)]
    c = cfg(nesterov=nesterov, min_lr=0.06)
    got = run_optax(optim.make_optimizer(c, T), params, grads)
    want = reference_sgd(params, grads, **c.to_dict())
    assert_close(got, want)

    lrs = [{k: float(v) for k, v in optim.learning_rates(c, T, jnp.asarray(t)).items()} for t in range(T + 2)]
    for t, lr in enumerate(lrs):
        poly = (1 - min(t, T) / T) ** 0.9
        np.testing.assert_allclose(lr["lr"], max(0.1 * poly, 0.06), rtol=1e-6)
        np.testing.assert_allclose(lr["lr_head"], max(1.0 * poly, 0.06), rtol=1e-6)
    assert [lr["lr"] for lr in lrs[2:]] == pytest.approx([0.06] * T)  # the last steps sit on the floor
    assert lrs[T]["lr_head"] == pytest.approx(0.06)  # the head reaches it at T


def test_learning_rates_logging_and_defaults():
    c = cfg(lr=0.01, lr_multi=10.0)
    for t in range(T + 1):
        lrs = optim.learning_rates(c, T, jnp.asarray(t))
        assert set(lrs) == {"lr", "lr_head"}
        np.testing.assert_allclose(float(lrs["lr"]), 0.01 * (1 - t / T) ** 0.9, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(float(lrs["lr_head"]), 0.1 * (1 - t / T) ** 0.9, rtol=1e-6, atol=1e-12)

    # Absent keys mean today's behaviour: decay on all leaves, no floor; bit-identical to explicit ones.
    params = two_nets(np.random.default_rng(7))
    grads = grads_like(params, 8)
    implicit = run_optax(optim.make_optimizer(c, T), params, grads)
    explicit = run_optax(optim.make_optimizer(cfg(lr=0.01, weight_decay_on="all", min_lr=0.0, lr_after_step=False), T),
                         params, grads)
    for k in implicit:
        np.testing.assert_array_equal(implicit[k], explicit[k])


def test_lr_after_step_sequence_logging_and_resume():
    """lr_after_step: LiheYoung/UniMatch `unimatch.py` lines 194-208 (and `supervised.py` 177-184)
    at 0324f3dd4a22128105a5eb135d2586c0bb3cc647 call `optimizer.step()`, then set the lr from the
    index of that step, so steps 0..T-1 run at base, poly(0), poly(1), ..., poly(T-2)."""
    c = cfg(lr_after_step=True, min_lr=0.06)  # the floor applies to the shifted poly
    poly = (1 - np.arange(T) / T) ** 0.9  # poly(0..T-1): 1, 0.772, 0.536, 0.287
    shifted = np.array([1.0, poly[0], poly[1], poly[2]])
    lrs = [optim.learning_rates(c, T, jnp.asarray(t)) for t in range(T)]
    np.testing.assert_allclose([float(lr["lr"]) for lr in lrs], np.maximum(0.1 * shifted, 0.06), rtol=1e-6)
    np.testing.assert_allclose([float(lr["lr_head"]) for lr in lrs], np.maximum(1.0 * shifted, 0.06), rtol=1e-6)

    params = two_nets(np.random.default_rng(9))
    rng = np.random.default_rng(10)
    grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(T)]
    reference = reference_sgd(params, grads, **c.to_dict())
    assert_close(run_optax(optim.make_optimizer(c, T), params, grads), reference)
    assert not np.allclose(reference_sgd(params, grads, **cfg(min_lr=0.06).to_dict())["branch1/aspp/conv/kernel"],
                           reference["branch1/aspp/conv/kernel"])  # the shift changes the run

    # A resume after 2 steps: a new optimizer from the saved state (host copies, as a checkpoint)
    # continues the sequence from optax's step count.
    tx = optim.make_optimizer(c, T)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    for t in range(T):
        if t == 2:
            p, state = jax.device_get((p, state))
            tx = optim.make_optimizer(c, T)
        updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads[t]), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    assert_close(flat(p), reference)


# --- AdamW and the untrained groups ----------------------------------------------------------

def with_untrained(rng):
    """one_net plus a 'locked' module (labelled 'frozen') and a `mask_token` (labelled 'no_grad'), with
    shapes no trained leaf has."""
    return {**one_net(rng), "locked": {"kernel": rng.normal(size=(7, 3)), "bias": rng.normal(size=(7,))},
            "mask_token": rng.normal(size=(1, 5))}


def untrained_labels(params):
    """'frozen' under `locked`, 'no_grad' for `mask_token`, else the default groups."""
    def label(path, default):
        names = [p.key for p in path]
        return "frozen" if names[0] == "locked" else "no_grad" if names[0] == "mask_token" else default

    return jax.tree_util.tree_map_with_path(label, optim.param_groups(params))


def run_torch_adamw(params, grads_seq, *, lr, lr_multi, weight_decay, poly_power, decayed=lambda name: True):
    """UniMatch V2's loop (`unimatch_v2.py:67-73,216-219`) in float64: torch.optim.AdamW over the
    backbone (lr) and head (lr * lr_multi) groups, split further by weight decay when `decayed` says
    so; step t, then every group's lr <- base * (1 - t/T)^power, T = len(grads_seq). 'locked' is left out of the
    optimizer (lock_backbone); `mask_token` is in it but never gets a gradient."""
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in flat(params).items()}
    groups = {}
    for name, tensor in tensors.items():
        if name.startswith("locked/"):
            continue
        key = ("backbone" in name.split("/")[:-1], decayed(name))
        groups.setdefault(key, []).append(tensor)
    base = {key: lr if key[0] else lr * lr_multi for key in groups}
    opt = torch.optim.AdamW([{"params": ps, "lr": base[key], "weight_decay": weight_decay if key[1] else 0.0}
                             for key, ps in groups.items()], betas=(0.9, 0.999), eps=1e-8)
    for t, grads in enumerate(grads_seq):
        for name, g in flat(grads).items():
            tensors[name].grad = None if name == "mask_token" else torch.tensor(g, dtype=torch.float64)
        opt.step()
        for group, key in zip(opt.param_groups, groups):
            group["lr"] = base[key] * (1 - t / len(grads_seq)) ** poly_power
    return {k: v.numpy() for k, v in tensors.items()}


def run_optax_f64(tx, params, grads_seq):
    """`run_optax` in float64."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        state = tx.init(params)
        for grads in grads_seq:
            updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), grads), state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return flat(params), state


@pytest.mark.parametrize("decay_on", ["all", "kernels"])
def test_adamw_groups_match_torch_adamw(decay_on):
    """Spec unimatch_v2.md §16 item 7: two lr groups (lr_multi 40), the lr set after each step, 5 steps,
    float64 (but for optax's float32 lr schedule: 2e-8 apart), within 1e-7; decay on biases and norm
    scales too ('all'); 'frozen' and 'no_grad' leaves bit-identical although their gradients are not
    zero, with no Adam moments."""
    params = with_untrained(np.random.default_rng(11))
    rng = np.random.default_rng(12)
    grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(5)]
    c = cfg(name="adamw", lr=5e-3, lr_multi=40.0, weight_decay=0.01, weight_decay_on=decay_on, lr_after_step=True)
    got, state = run_optax_f64(optim.make_optimizer(c, len(grads), param_labels=untrained_labels), params, grads)
    decayed = (lambda name: True) if decay_on == "all" else (lambda name: name.endswith("/kernel"))
    want = run_torch_adamw(params, grads, lr=c.lr, lr_multi=c.lr_multi, weight_decay=c.weight_decay,
                           poly_power=c.poly_power, decayed=decayed)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-7, err_msg=k)
    initial = flat(params)
    for k in ("locked/kernel", "locked/bias", "mask_token"):
        np.testing.assert_array_equal(got[k], initial[k], err_msg=k)
    assert not any(np.shape(leaf) in ((7, 3), (7,), (1, 5)) for leaf in jax.tree.leaves(state))
    # The decay is there, on biases and BN scales too when 'all', and nowhere but kernels otherwise.
    no_wd = run_torch_adamw(params, grads, lr=c.lr, lr_multi=c.lr_multi, weight_decay=0.0, poly_power=c.poly_power)
    for k in ("aspp/bn/scale", "classifier/bias", "backbone/layer1/conv/kernel"):
        assert (np.abs(no_wd[k] - want[k]).max() > 1e-6) == decayed(k), k


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_untrained_groups_change_nothing_else(name):
    """'frozen' and 'no_grad' leaves stay bit-identical under either optimizer, and every other leaf
    moves exactly as in a run without them; their groups join the state only when used."""
    params = with_untrained(np.random.default_rng(13))
    rng = np.random.default_rng(14)
    grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(STEPS)]
    c = cfg(name=name)
    got = run_optax(optim.make_optimizer(c, T, param_labels=untrained_labels), params, grads)
    trained_only = {k: v for k, v in params.items() if k not in ("locked", "mask_token")}
    want = run_optax(optim.make_optimizer(c, T), trained_only, [{k: g[k] for k in trained_only} for g in grads])
    for k, v in flat(params).items():
        np.testing.assert_array_equal(got[k], want[k] if k in want else np.float32(v), err_msg=k)
    assert set(optim.make_optimizer(c, T).init(trained_only).inner_states) == {"backbone", "head"}
    used = optim.make_optimizer(c, T, param_labels=untrained_labels).init(params).inner_states
    assert set(used) == {"backbone", "head", "frozen", "no_grad"}


def test_adamw_defaults_and_unknown_name():
    """A config without `name` is SGD (LATER_FIELDS: a run saved before resumes as SGD); an unknown
    name is refused."""
    from configs import demo
    from csl_jax import workdir

    saved, now = demo.get_config(), demo.get_config()
    del saved.optim["name"]
    assert workdir.resume_differences(saved, now) == []
    now.optim.name = "adamw"
    assert workdir.resume_differences(saved, now) == ["config.optim.name: saved (absent: 'sgd'), now 'adamw'"]
    with pytest.raises(ValueError, match=r"config.optim.name must be one of \('sgd', 'adamw'\), got 'adam'"):
        optim.make_optimizer(cfg(name="adam"), T)
