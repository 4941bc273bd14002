"""csl_jax.methods.weak_to_strong: loss composition and BN policy against a NumPy reference, pseudo-label
metrics, and device-count independence of the whole train step (CSL, UniMatch, FixMatch)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from csl_jax import parallel
from csl_jax.evaluation import loop
from csl_jax.methods import StepContext, build_method, weak_to_strong
from csl_jax.methods.parts import passes, pseudo_labels
from csl_jax.models import build_model, layers
from tests.helpers import harness

NUM_CLASSES = 3
CROP = 32
TAU = 0.4  # near-uniform tiny-model predictions: some pixels above, some below


def make_config(preset, group_size=2, batch=2, **options):
    c = common.tiny_model(common.get_base_config(), width=4, head_width=16)
    c.model.depth = 50
    c.data.crop_size = CROP
    c.batch.labeled = batch
    c.batch.unlabeled = batch
    c.loss.group_size = group_size
    c.method = weak_to_strong.default_options(preset)
    c.method.tau = TAU
    c.method.update(options)
    return c


def make_batch(seed, n):
    """A global batch of n labeled, n unlabeled and n mix images with every view."""
    rng = np.random.default_rng(seed)

    def images():
        return rng.normal(size=(n, CROP, CROP, 3)).astype(np.float32)

    def box():
        out = np.zeros((n, CROP, CROP), bool)
        for i in range(0, n, 2):  # every other sample has no box
            y, x = rng.integers(0, CROP // 2, 2)
            out[i, y:y + rng.integers(4, CROP // 2), x:x + rng.integers(4, CROP // 2)] = True
        return out

    def unlabeled():
        ignore = np.zeros((n, CROP, CROP), np.int32)
        ignore[0, -7:] = 255  # crop padding
        ignore[-1, :, -5:] = 255
        label = rng.integers(0, NUM_CLASSES, (n, CROP, CROP)).astype(np.int32)
        label[rng.random(label.shape) < 0.2] = 255
        blocks = np.kron(rng.random((n, 4, 4)) < 0.7, np.ones((8, 8))).astype(bool)
        blocks[1::2] = False  # TMP coin chose the strong branch
        return {"weak": images(), "ignore": ignore, "label": label, "strong": images(), "cutmix_box": box(),
                "strong2": images(), "cutmix_box2": box(), "tmp": images(), "block_mask": blocks}

    label = rng.integers(0, NUM_CLASSES, (n, CROP, CROP)).astype(np.int32)
    label[:, :3] = 255
    return {"labeled": {"image": images(), "label": label}, "unlabeled": unlabeled(), "mix": unlabeled()}


def init_variables(model, seed):
    """Model variables with non-trivial running statistics (so eval mode differs from train mode)."""
    variables = model.init({"params": jax.random.PRNGKey(seed)}, jnp.zeros((1, CROP, CROP, 3)), train=False)
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if path[-1].key == "mean":
            return jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32)
        return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32)

    stats = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


# ---------------------------------------------------------------------------------------------
# NumPy reference of one step, from the logits the (single-device) model produces
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0, static_argnames=("train", "feature_perturb"))
def apply_model(model, variables, x, rng=None, *, train, feature_perturb=False):
    """model.apply under jit: logits (eval mode) or (logits or (logits, logits_fp), new batch_stats) (train)."""
    if not train:
        return model.apply(variables, x, train=False)[0]
    ids = jnp.arange(x.shape[0]) if feature_perturb else None
    (logits, out), new = model.apply(variables, x, train=True, feature_perturb=feature_perturb, sample_ids=ids,
                                     rngs={"dropout": rng}, mutable=["batch_stats"])
    return ((logits, out["logits_fp"]) if feature_perturb else logits), new["batch_stats"]


csl_weights = jax.jit(pseudo_labels.csl_weights, static_argnums=(2, 3, 4))


def np_softmax(z):
    z = np.float64(z)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_grouped_ce(logits, labels, weights, group_size):
    """sum w CE over pixels with label != 255 / their count, per group; mean over groups (float64)."""
    z = np.float64(logits)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    valid = labels != 255
    picked = np.take_along_axis(z, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    ce = np.where(valid, (lse - picked) * weights, 0.0)
    groups = ce.shape[0] // group_size
    num = ce.reshape(groups, -1).sum(1)
    den = valid.reshape(groups, -1).sum(1)
    return float(np.mean(num / np.maximum(den, 1)))


def np_targets(logits, ignore, opts):
    """(label, weight, ignore, reliable) numpy; CSL weights from pseudo_labels (tested on its own)."""
    probs = np_softmax(logits)
    valid = ignore != 255
    if opts.selector == "threshold":
        weight = (valid & (probs.max(-1) >= opts.tau)).astype(np.float64)
    else:
        probs32 = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        weight = np.float64(csl_weights(probs32, valid, opts.alpha, opts.variance_scaling, opts.eps)[0])
    return probs.argmax(-1), weight, ignore, valid & (weight == 1.0)


def reference_step(config, model, variables, teacher, batch, rng):
    """Loss terms and kept BN statistics of one step, following docs/methods/csl.md §9 and
    docs/methods/unimatch.md ("One iteration") literally."""
    o, g = config.method, config.loss.group_size
    lab, unl, mix = batch["labeled"], batch["unlabeled"], batch["mix"]
    n = lab["image"].shape[0]
    params, stats0 = variables["params"], variables["batch_stats"]

    def train_pass(stats, x, feature_perturb=False):
        out, new = apply_model(model, {"params": params, "batch_stats": stats}, x, rng, train=True,
                               feature_perturb=feature_perturb)
        return jax.tree.map(np.asarray, out), new

    if o.teacher == "ema":
        t = np.asarray(apply_model(model, teacher, np.concatenate([unl["weak"], mix["weak"]]), train=False))
        t_main, t_mix = t[:n], t[n:]
    elif o.mix_pass_bn == "eval":
        t_mix = np.asarray(apply_model(model, variables, mix["weak"], train=False))
    else:
        t_mix = train_pass(stats0, mix["weak"])[0]
    main_in = np.concatenate([lab["image"], unl["weak"]])
    if o.use_fp:
        (z, z_fp), stats_main = train_pass(stats0, main_in, feature_perturb=True)
    else:
        z, stats_main = train_pass(stats0, main_in)
    if o.teacher == "online":
        t_main = z[n:]
    y, w, ign, reliable = np_targets(t_main, unl["ignore"], o)
    y2, w2, ign2, _ = np_targets(t_mix, mix["ignore"], o)

    def mixed(box, own_img, mix_img):
        b = box[..., None]
        return (np.where(b, mix_img, own_img), np.where(box, y2, y), np.where(box, w2, w), np.where(box, ign2, ign))

    views = [mixed(unl["cutmix_box"], unl["strong"], mix["strong"])]
    if o.second_view == "tmp":
        views.append((np.where((reliable & unl["block_mask"])[..., None], 0.0, unl["tmp"]), y, w, ign))
    elif o.second_view == "cutmix":
        views.append(mixed(unl["cutmix_box2"], unl["strong2"], mix[o.second_view_source]))
    z_strong, stats_strong = train_pass(stats_main, np.concatenate([v[0] for v in views]))

    def unsup(logits, lbl, wt, ig):
        return np_grouped_ce(logits, np.where(ig == 255, 255, lbl), wt, g)

    terms = {"loss_x": np_grouped_ce(z[:n], lab["label"], np.ones(lab["label"].shape), g)}
    strong = [unsup(z_strong[k * n:(k + 1) * n], *v[1:]) for k, v in enumerate(views)]
    terms["loss_s"] = strong[0]
    if len(strong) == 2:
        terms["loss_m" if o.second_view == "tmp" else "loss_s2"] = strong[1]
    if o.use_fp:
        terms["loss_fp"] = unsup(z_fp[n:], y, w, ign)
        terms["loss"] = (terms["loss_x"] + 0.25 * sum(strong) + 0.5 * terms["loss_fp"]) / 2
    else:
        terms["loss"] = (terms["loss_x"] + sum(strong)) / 2
    terms["mask_ratio"] = reliable.sum() / (ign != 255).sum()
    return terms, stats_main, stats_strong


def method_step(method, variables, extra, batch, rng):
    """method.loss on a 1-device mesh (its BN is SyncBN over 'data'): (loss, {'metrics', 'batch_stats'})."""
    n = batch["labeled"]["image"].shape[0]

    def per_device(params, state, batch):
        ctx = StepContext(rng=rng, step=jnp.int32(0), device_index=jax.lax.axis_index(parallel.AXIS), num_devices=1,
                          steps_per_epoch=1, stream_offsets={"labeled": 0, "unlabeled": n, "mix": 2 * n})
        loss, (state, metrics) = method.loss(params, state, batch, ctx)
        return loss, {"metrics": metrics, "batch_stats": state["batch_stats"]}

    fn = harness.sharded(per_device, 1, in_specs=(P(), P(), P(parallel.AXIS)))
    return fn(variables["params"], dict(extra, batch_stats=variables["batch_stats"]), batch)


PRESETS = {
    "csl_ema": ("csl", {}),
    "csl_online": ("csl", {"teacher": "online"}),
    "csl_released": ("csl", dict(weak_to_strong.VARIANTS["csl_released"], variant="csl_released")),
    "unimatch": ("unimatch", {}),
    "fixmatch": ("fixmatch", {}),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_loss_and_bn_policy_match_numpy_reference(name):
    preset, options = PRESETS[name]
    config = make_config(preset, **options)
    local_model = build_model(config.model, NUM_CLASSES)
    method = build_method(config, NUM_CLASSES)
    variables = init_variables(local_model, 1)
    teacher = init_variables(local_model, 2)  # differs from the student: the test sees which one is used
    extra = {"teacher": teacher} if config.method.teacher == "ema" else {}
    batch = make_batch(3, 4)
    rng = jax.random.PRNGKey(7)

    loss, aux = method_step(method, variables, extra, batch, rng)
    ref, stats_main, stats_strong = reference_step(config, local_model, variables, teacher, batch, rng)

    metrics = aux["metrics"]
    assert 0.0 < ref["mask_ratio"] < 1.0, "degenerate test case: every or no pixel is reliable"
    for key, value in ref.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)

    # BN policy: CSL keeps the main pass's statistics only, UniMatch/FixMatch also the strong pass's.
    expected, other = (stats_strong, stats_main) if config.method.strong_pass_updates_bn else (stats_main, stats_strong)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert np.max(np.abs(flat(expected) - flat(other))) > 1e-4
    np.testing.assert_allclose(flat(aux["batch_stats"]), flat(expected), rtol=1e-5, atol=1e-6)


def test_unlabeled_views_and_presets():
    assert build_method(make_config("csl"), NUM_CLASSES).unlabeled_views == ("strong", "tmp")
    assert build_method(make_config("unimatch"), NUM_CLASSES).unlabeled_views == ("strong", "strong2")
    assert build_method(make_config("fixmatch"), NUM_CLASSES).unlabeled_views == ("strong",)
    released = build_method(make_config("csl", **weak_to_strong.VARIANTS["csl_released"]), NUM_CLASSES).streams()
    assert released["unlabeled"].views == ("strong", "strong2") and released["mix"].views == ("strong",)
    with pytest.raises(ValueError, match="config.method.selector"):
        build_method(make_config("csl", selector="entropy"), NUM_CLASSES)
    config = make_config("csl")
    del config.method["teacher"]
    with pytest.raises(ValueError, match="config.method.teacher is missing"):
        build_method(config, NUM_CLASSES)


@pytest.mark.parametrize("name,key,value,valid", [
    ("csl", "alpha", 0.0, "> 0"), ("csl", "eps", -1e-8, "> 0"), ("unimatch", "tau", 1.5, "in [0, 1]"),
    ("csl", "ema_momentum", 1.0, "in [0, 1)"), ("csl", "use_fp", 1, "True or False"),
    ("fixmatch", "strong_pass_updates_bn", "no", "True or False"), ("csl", "alpha", "8", "> 0")])
def test_option_out_of_range_is_one_line_naming_it(name, key, value, valid):
    config = make_config(name)
    config.method = ml_collections.ConfigDict({**config.method.to_dict(), key: value})  # e.g. a config.json typo
    with pytest.raises(ValueError) as error:
        build_method(config, NUM_CLASSES)
    assert str(error.value) == f"config.method.{key}={value!r} must be {valid}"


def test_ema_momentum_is_free_with_the_online_teacher():
    assert build_method(make_config("csl", teacher="online", ema_momentum=1.0), NUM_CLASSES).best_predict == "model"


def test_method_name_that_contradicts_the_options_is_refused():
    from configs import common, csl_pascal, unimatch_pascal

    from csl_jax import methods

    # main.py's check (methods.check_config) and build_method refuse a name that only relabels
    # another preset, naming config.method.name, the preset the options are, and the flags to add.
    config = unimatch_pascal.get_config()
    config.method.name = "fixmatch"
    message = ("config.method.name='fixmatch', but the other config.method options are those of the 'unimatch' "
               "preset (second_view='cutmix', use_fp=True; 'fixmatch' has second_view='none', use_fp=False); "
               "the name does not change them, so this would train unimatch labelled fixmatch. To train fixmatch, "
               "also set --config.method.second_view=none --config.method.use_fp=False (model, data and schedule "
               "stay the config file's); to train unimatch, set config.method.name='unimatch'.")
    for check in (methods.check_config, lambda c: build_method(c, NUM_CLASSES)):
        with pytest.raises(ValueError) as error:
            check(config)
        assert str(error.value) == message
    config.method.update(second_view="none", use_fp=False)  # what the message asks for: FixMatch
    methods.check_config(config)
    assert build_method(config, NUM_CLASSES).unlabeled_views == ("strong",)
    config.method.teacher = "ema"  # an ablation away from FixMatch is not a contradiction
    methods.check_config(config)

    config = csl_pascal.get_config()
    config.method.name = "unimatch"
    with pytest.raises(ValueError, match=r"^config.method.name='unimatch', but the other config.method options are "
                                         r"those of the 'csl' preset \(mix_pass_bn='train', second_view='tmp', "
                                         r"selector='csl', strong_pass_updates_bn=False, teacher='ema'; "):
        methods.check_config(config)
    config = csl_pascal.get_config()
    config.method.teacher = "online"  # the official code's teacher: still CSL
    methods.check_config(config)
    config = common.get_recipe("cityscapes", "1_16", "unimatch")
    config.method.name = "csl"
    with pytest.raises(ValueError, match=r"to train unimatch, set config.method.name='unimatch'\.$"):
        methods.check_config(config)
    # every preset as made agrees with its name
    for name in weak_to_strong.METHODS:
        methods.check_config(common.get_recipe("pascal", "1464", name))
    # a semi-supervised name on a supervised config: its options are missing
    config = common.get_recipe("pascal", "1464", "supervised")
    config.method.name = "csl"
    with pytest.raises(ValueError, match=r"^config.method.alpha is missing; config.method.name='csl' needs"):
        methods.check_config(config)


def test_pseudo_label_metrics_against_numpy():
    rng = np.random.default_rng(0)
    shape = (2, 5, 6)
    pl = rng.integers(0, 3, shape)
    label = rng.integers(0, 3, shape)
    label[rng.random(shape) < 0.3] = 255
    ignore = np.where(rng.random(shape) < 0.2, 255, 0)
    weight = rng.random(shape)
    reliable = rng.random(shape) < 0.5
    weight[reliable] = 1.0
    got = jax.tree.map(float, passes.pseudo_label_metrics(pl, weight, reliable, ignore, label))

    valid = ignore != 255
    known = valid & (label != 255)
    ok = pl == label
    rel = reliable & valid
    assert got["mask_ratio"] == pytest.approx(rel.sum() / valid.sum())
    assert got["mean_weight"] == pytest.approx(weight[valid].mean())
    assert got["pl_acc"] == pytest.approx(ok[known].mean())
    assert got["pl_acc_reliable"] == pytest.approx(ok[known & rel].mean())
    assert got["pl_acc_rest"] == pytest.approx(ok[known & ~rel].mean())
    assert got["n_correct_reliable"] == (ok & known & rel).sum()

    # No ground truth at all: accuracies are 0, not NaN.
    none = jax.tree.map(float, passes.pseudo_label_metrics(pl, weight, reliable, ignore, np.full(shape, 255)))
    assert none["pl_acc"] == none["pl_acc_reliable"] == none["pl_acc_rest"] == 0.0 and none["n_labeled"] == 0.0


def test_diagnostics_use_the_teacher_and_mask_the_tmp_view(tmp_path):
    from csl_jax import train

    config = make_config("csl")
    method = build_method(config, NUM_CLASSES)
    model = method.model
    student, teacher = init_variables(model, 1), init_variables(model, 2)
    unl = make_batch(3, 2)["unlabeled"]
    state = train.TrainState(step=jnp.int32(0), params=student["params"], opt_state=None,
                             state={"batch_stats": student["batch_stats"], "teacher": teacher})
    diagnostics = jax.jit(method.diagnostics)
    out = diagnostics(state, {"unlabeled": unl})

    y, w, _, reliable = np_targets(np.asarray(apply_model(model, teacher, unl["weak"], train=False)),
                                   unl["ignore"], config.method)
    np.testing.assert_array_equal(np.asarray(out["pseudo_label"]), y)
    np.testing.assert_allclose(np.asarray(out["weight"]), w, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["tmp"]),
                                  np.where((reliable & unl["block_mask"])[..., None], 0.0, unl["tmp"]))
    assert out["conf"].shape == out["var"].shape == unl["ignore"].shape
    assert out["cluster_means"].shape == (2, 2, 2)

    loop.plot_diagnostics(diagnostics, state, {"unlabeled": unl}, str(tmp_path), 5,
                          np.eye(NUM_CLASSES, 3, dtype=np.uint8) * 255, num_images=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confidence_step0000005.png", "pseudo_labels_step0000005.png"]


# ---------------------------------------------------------------------------------------------
# Device-count independence of the whole train step (the trainer's make_train_step)
# ---------------------------------------------------------------------------------------------
def run_steps(config, devices, batch, steps=2, students=None):
    """(params, batch_stats, state, metrics) after `steps` steps; appends each step's student
    {'params', 'batch_stats'} (host copies) to `students` when given."""
    from csl_jax import train  # the trainer pulls in the data pipeline

    method = build_method(config, NUM_CLASSES)
    tx = optax.sgd(0.05, momentum=0.9)
    student = init_variables(method.model, 1)
    method_state = {"batch_stats": student["batch_stats"], "teacher": jax.tree.map(jnp.array, student)}
    stepper = harness.Stepper(config, method, devices, tx=tx, train_state=train.TrainState(
        step=jnp.int32(0), params=student["params"], opt_state=tx.init(student["params"]), state=method_state))
    for _ in range(steps):
        metrics = stepper.step(batch)
        if students is not None:  # copied before the next step donates the state
            students.append(jax.device_get({"params": stepper.train_state.params,
                                            "batch_stats": stepper.train_state.state["batch_stats"]}))
    state = stepper.host()
    return state.params, state.state["batch_stats"], state.state, metrics


@pytest.mark.parametrize("group_size", [1, 8])
def test_train_step_is_device_count_independent(group_size):
    """CSL preset: EMA teacher, CSL selector, TMP, FP, SyncBN, per-sample dropout ids, metrics; loss
    groups within a device (1) and spanning all 8 devices (8, CSL's Pascal group).

    CSL's selection (and every ReLU) is discontinuous: where a pixel lies within float32 rounding of
    a cluster boundary, 1 and 8 devices' different summation orders put it on different sides, and
    the step differs far beyond rounding (batch seed 8: 2 reliable pixels and the gradient norm, with
    the plain formulations; seed 5: with the train-time kernels, whose BatchNorm rounds differently).
    The batch (seed 6) has no such near-tie under either `layers.kernels`, and the test checks both."""
    config = make_config("csl", group_size=group_size, batch=8)
    batch = make_batch(6, 8)
    with layers.kernels("reference"):
        for a, b in zip(jax.tree.leaves(run_steps(config, 1, batch)), jax.tree.leaves(run_steps(config, 8, batch))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    students = []
    one = run_steps(config, 1, batch, students=students)  # the default kernels from here on
    eight = run_steps(config, 8, batch)
    assert set(one[3]) >= {"loss", "loss_x", "loss_s", "mask_ratio", "pl_acc"}
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # The EMA teacher (params and BN statistics) against a float64 NumPy EMA of the student after
    # each step: the update after step t (t = steps done before it) is
    # teacher <- d_t teacher + (1 - d_t) student, d_t = min(1 - 1/(t + 1), 0.99), so the first update
    # copies the student (d_0 = 0) and the second averages the two students (d_1 = 1/2).
    momentum = config.method.ema_momentum
    expected = jax.tree.map(np.float64, students[0])
    for t, student in enumerate(students[1:], start=1):
        d = min(1.0 - 1.0 / (t + 1), momentum)
        expected = jax.tree.map(lambda e, s, d=d: d * e + (1.0 - d) * np.float64(s), expected, student)
    teacher = one[2]["teacher"]
    assert jax.tree.structure(teacher) == jax.tree.structure(expected)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(teacher), jax.tree.leaves(expected)):
        # float32 EMA of float32 values: a few ulp of the larger operand
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # Non-degenerate: the two students differ, in params and in BN statistics, so the teacher (their
    # mean) is neither of them.
    final = {"params": one[0], "batch_stats": one[1]}
    for key in ("params", "batch_stats"):
        gap = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(students[0][key]),
                                                                 jax.tree.leaves(final[key])))
        assert gap > 1e-3, key
