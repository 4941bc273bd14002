"""U2PL's method plumbing: the teacher timeline against the official train_semi.py loop, the evaluated
network, in-batch CutMix partners, the data draws against the official samplers, option checks, and
one supervised-only + one semi-supervised step on the synthetic set (state written in the loss)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from csl_jax import train
from csl_jax.data import transforms
from csl_jax.methods import build_method, u2pl
from csl_jax.methods.u2pl import data as u2pl_data
from tests.helpers import harness

data_root = harness.data_root


def tiny_config(root=None, variant="reference", **method):
    return harness.tiny_method_config(lambda c: harness.tiny_u2pl(c, variant), root, total_steps=4, **method)


def official_teacher_timeline(students, length, e0, momentum):
    """The teacher params used in each step and after the last, as train_semi.py: at the start of every
    step of epoch E0 the teacher aliases the student (t.data = s.data); after the optimizer step of
    every epoch >= E0 the EMA with d = min(1 - 1/(i - L E0 + 1), momentum) runs."""
    teacher = -1.0  # its own initial params
    used = []
    for i in range(len(students) - 1):
        aliased = i // length == e0
        if aliased:
            teacher = students[i]
        used.append(teacher)
        student = students[i + 1]  # the optimizer step (the alias sees it too)
        if aliased:
            teacher = student
        if i // length >= e0:
            d = min(1 - 1 / (i - length * e0 + 1), momentum)
            teacher = d * teacher + (1 - d) * student
    return used, teacher


@pytest.mark.parametrize("e0", [0, 1, 2])
def test_teacher_timeline_matches_train_semi(e0):
    length, steps, momentum = 3, 13, 0.9
    method = u2pl.U2PL.__new__(u2pl.U2PL)
    method.opts = ml_collections.ConfigDict(dict(sup_only_epochs=e0, ema_momentum=momentum))
    students = list(np.random.default_rng(e0).normal(size=steps + 1))
    used, final = official_teacher_timeline(students, length, e0, momentum)
    teacher0 = students[0] if e0 == 0 else -1.0  # `init` copies the student when E0 = 0
    state = {"teacher": {"params": jnp.float32(teacher0)}, "steps_per_epoch": jnp.int32(length)}
    for i in range(steps):
        if i >= length * e0:  # the teacher only matters from epoch E0 on
            np.testing.assert_allclose(float(state["teacher"]["params"]), used[i], rtol=1e-5, err_msg=f"step {i}")
        state = method.after_update(state, jnp.float32(students[i + 1]), jnp.int32(i))
    np.testing.assert_allclose(float(state["teacher"]["params"]), final, rtol=1e-5)


def test_model_predicts_with_the_student_until_epoch_e0_then_the_teacher():
    method = u2pl.U2PL.__new__(u2pl.U2PL)
    method.opts = ml_collections.ConfigDict(dict(sup_only_epochs=2))
    method._check_predict_name = lambda name: None
    state = {"batch_stats": {"s": jnp.float32(1)}, "teacher": {"params": {"p": jnp.float32(20)},
                                                              "batch_stats": {"s": jnp.float32(2)}},
             "steps_per_epoch": jnp.int32(5)}
    for done, want in ((0, 10.0), (10, 10.0), (11, 20.0)):  # U2PL validates after epoch e: student iff e < E0
        ts = train.TrainState(step=jnp.int32(done), params={"p": jnp.float32(10)}, opt_state=None, state=state)
        assert float(method.eval_variables(ts, "model")["params"]["p"]) == want
    assert float(method.eval_variables(ts, "student")["params"]["p"]) == 10.0
    assert float(method.eval_variables(ts, "teacher")["batch_stats"]["s"]) == 2.0


def test_cutmix_partner_is_the_next_image_of_the_group():
    x = jnp.arange(8)[:, None]
    np.testing.assert_array_equal(np.asarray(u2pl._partner(x, 4))[:, 0], [1, 2, 3, 0, 5, 6, 7, 4])


def reference_cutout_box(rs, size):
    """generate_cutout_mask (u2pl/dataset/augmentation.py) as a box: True where the partner is pasted."""
    area = size * size / 2
    w = rs.randint(size / 2 + 1, size)
    h = np.round(area / w)
    x0 = rs.randint(0, size - w + 1)
    y0 = rs.randint(0, size - h + 1)
    box = np.zeros((size, size), bool)
    box[int(y0):int(y0 + h), int(x0):int(x0 + w)] = True
    return box


def test_cutout_box_has_the_reference_distribution():
    size, n = 33, 4000
    ours = np.stack([u2pl_data.cutout_box(np.random.default_rng(i), size) for i in range(n)])
    rs = np.random.RandomState(0)
    ref = np.stack([reference_cutout_box(rs, size) for _ in range(n)])
    widths = lambda b: b.any(1).sum(1)  # noqa: E731
    assert set(widths(ours)) == set(widths(ref)) == set(range(size // 2 + 1, size))
    np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.05)  # per-pixel paste frequency
    np.testing.assert_allclose(ours.mean(), ref.mean(), atol=0.005)


def test_u2pl_geometry_scale_and_crop_draws():
    draws = [u2pl_data.sample_u2pl_geometry(np.random.default_rng(i), 100, 200, 129) for i in range(3000)]
    scales = np.array([g.resized_w / 200 for g in draws])
    assert abs(np.mean(scales < 1.0) - 0.5) < 0.03 and scales.min() >= 0.5 and scales.max() < 2.0
    assert all(abs(g.resized_h / 100 - g.resized_w / 200) < 0.02 for g in draws)  # one scale for both sides
    for g in draws:  # centred padding (floor(pad / 2) before, mirrored by the flip) when short, else uniform
        for start, side, mirrored in ((g.y, g.resized_h, False), (g.x, g.resized_w, g.flip)):
            pad = 129 - side
            before = pad - pad // 2 if mirrored else pad // 2
            assert start == -before if side < 129 else 0 <= start <= side - 129
        assert g.resample == "torch" and g.fill == transforms.MEAN_FILL and g.label_fill == 255
    assert abs(np.mean([g.flip for g in draws]) - 0.5) < 0.03
    assert u2pl_data.sample_u2pl_geometry(np.random.default_rng(0), 100, 200, 129, label_fill=0).label_fill == 0


def test_u2pl_geometry_is_the_reference_resize_pad_then_crop():
    """`RandResize` (torch bilinear, legacy nearest), `Crop` (symmetric padding with the mean colour and
    label 0, then the offset over the padded size) of u2pl/dataset/augmentation.py, transcribed."""
    torch = pytest.importorskip("torch")
    crop = 32
    for seed in range(8):
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
        label = rng.integers(0, 5, (30, 44), dtype=np.uint8)
        g = transforms.GEOMETRIES["u2pl_pad0"](np.random.default_rng(100 + seed), 30, 44, crop)
        out, lab, _ = transforms.apply_geometry(Image.fromarray(image), label, g, crop)
        t = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
        img = torch.nn.functional.interpolate(t, size=(g.resized_h, g.resized_w), mode="bilinear",
                                              align_corners=False)[0].permute(1, 2, 0).numpy()
        lab_ref = torch.nn.functional.interpolate(torch.from_numpy(label)[None, None].float(),
                                                  size=(g.resized_h, g.resized_w), mode="nearest")[0, 0].numpy()
        if g.flip:
            img, lab_ref = img[:, ::-1], lab_ref[:, ::-1]
        pad_h, pad_w = max(crop - g.resized_h, 0), max(crop - g.resized_w, 0)
        pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        img = np.stack([np.pad(img[..., k], pads, constant_values=255 * float(transforms.IMAGENET_MEAN[k]))
                        for k in range(3)], -1)
        lab_ref = np.pad(lab_ref, pads, constant_values=0)
        # the offset in padded coordinates; the reference flips before padding and cropping, we flip last
        oy = g.y + pads[0][0]
        ox = g.x + pads[1][0] if not g.flip else g.resized_w - crop - g.x + pads[1][0]
        assert 0 <= oy <= img.shape[0] - crop and 0 <= ox <= img.shape[1] - crop
        np.testing.assert_array_equal(lab, lab_ref[oy:oy + crop, ox:ox + crop])
        assert np.abs(out - img[oy:oy + crop, ox:ox + crop]).max() <= 0.5 + 1e-9 + 0.33  # uint8, mean fill rounded


def test_pad_label_0_selects_the_reference_geometry_and_keeps_unlabeled_padding(tmp_path):
    """pad_label=0: label-0 padding geometry, and the unlabeled padding map no longer changes the
    loss (it does with pad_label=255 on a batch with padding)."""
    from jax.sharding import PartitionSpec as P

    from csl_jax.methods import StepContext

    root = harness.prepare_synthetic(tmp_path, image_size=(24, 24))
    losses = {}
    for pad_label in (255, 0):
        config = tiny_config(root, sup_only_epochs=0, pad_label=pad_label)
        method = build_method(config, 5)
        assert method.streams()["labeled"].geometry == ("u2pl" if pad_label == 255 else "u2pl_pad0")
        batch = train.make_streams(config, method).next()
        assert (batch["unlabeled"]["ignore"] == 255).any()  # 24 px images in 32 px crops: padding
        params, state = method.init(jax.random.PRNGKey(0), (32, 32, 3))
        offsets = train.stream_offsets(method, config.batch)

        def loss(batch, method=method, params=params, state=state, offsets=offsets):
            ctx = StepContext(rng=jax.random.PRNGKey(1), step=jnp.int32(3), device_index=jax.lax.axis_index("data"),
                              num_devices=1, steps_per_epoch=1, stream_offsets=offsets)
            return method.loss(params, state, batch, ctx)[0]

        fn = harness.sharded(loss, 1, in_specs=(P("data"),))
        unmarked = dict(batch, unlabeled=dict(batch["unlabeled"], ignore=np.zeros_like(batch["unlabeled"]["ignore"])))
        losses[pad_label] = float(fn(batch)), float(fn(unmarked))
    assert losses[0][0] == losses[0][1]
    assert abs(losses[255][0] - losses[255][1]) > 1e-4


def test_old_u2pl_configs_without_the_later_fields_still_build():
    """A config saved before pad_label, class_pairing, queue_write and labeled_repeat existed (with its
    default reference_onehot=False) builds the method it ran: the intended variant, tiled labeled list."""
    c = tiny_config()
    for key in ("pad_label", "class_pairing", "queue_write", "labeled_repeat", "variant"):
        del c.method[key]
    c.method.reference_onehot = False
    method = build_method(c, 5)
    intended = tiny_config(variant="intended").method
    assert all(method.opts[k] == intended[k] for k in u2pl.VARIANTS["intended"])
    assert method.streams()["unlabeled"].geometry == "u2pl"
    assert method.streams()["labeled"].repeat == "tile"  # its data order, so it resumes exactly
    assert build_method(tiny_config(), 5).streams()["labeled"].repeat == "sample"  # U2PL's random.sample


@pytest.mark.parametrize("module,arg,split,variant", [
    ("u2pl_pascal", "1464", "1464", "reference"), ("u2pl_pascal", "92,intended", "92", "intended"),
    ("u2pl_cityscapes", "", "744", "reference"), ("u2pl_cityscapes", "186,intended", "186", "intended"),
    ("u2pl_camvid", "1_8,reference", "1_8", "reference")])
def test_configs_run_the_reference_by_default_and_the_intended_variant_by_name(module, arg, split, variant):
    import importlib

    c = importlib.import_module(f"configs.{module}").get_config(arg) if arg else \
        importlib.import_module(f"configs.{module}").get_config()
    want = {k: u2pl.default_options()[k] for k in u2pl.VARIANTS["intended"]}
    want.update(u2pl.VARIANTS[variant])
    assert c.data.split == split
    assert {k: c.method[k] for k in want} == want
    assert c.method.variant == ("u2pl" if variant == "reference" else "u2pl_intended")
    if variant == "reference":  # the official behaviour: its one-hot, pairing, key writes, label-0 padding
        assert (c.method.reference_onehot, c.method.class_pairing, c.method.queue_write, c.method.pad_label) == (
            True, "reference", "newest", 0)
    if module != "u2pl_camvid":
        assert c.model.init_from == "imagenet:resnet101_u2pl"
    if module == "u2pl_pascal":  # the published numbers are the best in-training centre-crop results
        assert c.eval.best == "model:center_crop" and c.eval.center_crop_pad_label == 0
    with pytest.raises(ValueError, match="U2PL variant 'fixed'"):
        importlib.import_module(f"configs.{module}").get_config(f"{split},fixed")


@pytest.mark.parametrize("key,value", [("low_rank", 20), ("cutmix_prob", 1.5), ("num_queries", 0), ("pad_label", 1),
                                       ("sup_only_epochs", -1), ("ema_momentum", 1.0), ("class_pairing", "fixed"),
                                       ("queue_write", "all"), ("high_rank", 0)])
def test_bad_options_are_refused_by_name(key, value):
    c = tiny_config()
    c.method[key] = value
    with pytest.raises(ValueError, match=f"config.method.{key}"):
        build_method(c, 5)


def test_refuses_another_model_and_unequal_batches():
    harness.assert_refuses_another_model_and_unequal_batches(tiny_config)


@pytest.mark.parametrize("variant", sorted(u2pl.VARIANTS))
def test_supervised_only_then_semi_step_state(data_root, variant):
    config = tiny_config(data_root, variant)
    method = build_method(config, 5)
    streams = train.make_streams(config, method)
    stepper = harness.Stepper(config, method, 2, tx=optax.sgd(0.01))
    head_mean0 = stepper.initial.state["teacher"]["batch_stats"]["decoder"]["head_1"]["mean"]
    m0 = stepper.step(streams.next())  # step 0: epoch 0 < E0 = 1
    ts1 = stepper.host()
    s1 = ts1.state
    assert float(m0["loss_u"]) == 0.0 and float(m0["mask_ratio"]) == 0.0 and int(s1["queue"]["fill"].sum()) == 0
    assert not np.allclose(s1["teacher"]["batch_stats"]["decoder"]["head_1"]["mean"], head_mean0)  # its own BN moved
    same = jax.tree.map(np.array_equal, s1["teacher"]["params"], ts1.params)
    assert all(jax.tree.leaves(same))  # copied after step L E0 - 1 = 0
    loss_c = []
    for _ in range(3):  # steps 1-3: semi-supervised (the reference's gated keys are rare: an empty bank at first)
        m1 = stepper.step(streams.next())
        loss_c.append(float(m1["loss_c"]))
    ts2 = stepper.host()
    s2 = ts2.state
    fill = s2["queue"]["fill"]
    assert float(m1["loss_u"]) > 0 and max(loss_c) > 0
    assert abs(float(m1["mask_ratio"]) - 0.95) < 0.02  # epoch 3 of 4 drops q = 20 % x (1 - 3/4) of the pixels
    assert fill.sum() > 0 and (fill < np.array(method.capacities)).all()  # a half-filled bank
    np.testing.assert_array_equal(s2["queue"]["ptr"], fill % np.array(method.capacities))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ts2.params))


def test_benchmark_cost_model_counts_u2pl_passes():
    from benchmarks import train_step

    # eval-mode teacher on u (B_u) + student train pass 3 (B_l + B_u) + teacher no-grad train pass (B_l + B_u)
    assert train_step.forward_passes(u2pl.default_options(), 16, 16, 0.3) == 16 + 3 * 32 + 32
    config = train_step.make_config("u2pl", 50, 8, 33, "float32", 2, 2, tiny=True)
    assert config.model.name == "u2pl" and config.loss.group_size == 2


def test_supervised_only_phase_gives_the_labeled_only_loss_and_gradient(data_root):
    from jax.sharding import PartitionSpec as P

    from csl_jax.methods import StepContext
    from csl_jax.methods.parts import passes

    config = tiny_config(data_root)
    method = build_method(config, 5)
    batch = train.make_streams(config, method).next()
    params, state = method.init(jax.random.PRNGKey(0), (32, 32, 3))
    offsets = train.stream_offsets(method, config.batch)

    def both(params, state, batch):
        ctx = StepContext(rng=jax.random.PRNGKey(1), step=jnp.int32(0), device_index=jax.lax.axis_index("data"),
                          num_devices=1, steps_per_epoch=1, stream_offsets=offsets)
        (loss, (new_state, _)), grads = jax.value_and_grad(method.loss, has_aux=True)(params, state, batch, ctx)
        rng_s = jax.random.split(ctx.rng, 5)[0]
        lab = batch["labeled"]

        def labeled_only(p):  # the reference's epoch < E0 step: the student on x alone
            (logits, out), stats = passes.train_pass(method.model, p, state["batch_stats"], lab["image"], rng=rng_s,
                                                     sample_ids=ctx.sample_ids("labeled", 4))
            return method._supervised(logits, out, lab["label"]), stats

        (ref_loss, ref_stats), ref_grads = jax.value_and_grad(labeled_only, has_aux=True)(params)
        return loss, grads, new_state["batch_stats"], ref_loss, ref_grads, ref_stats

    fn = harness.sharded(both, 1, in_specs=(P(), P(), P("data")))
    loss, grads, stats, ref_loss, ref_grads, ref_stats = jax.device_get(fn(params, state, batch))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)
    means = jax.tree_util.tree_leaves_with_path(stats)
    for (path, got), want in zip(means, jax.tree.leaves(ref_stats)):
        if jax.tree_util.keystr(path).endswith("['mean']"):  # running variances differ by n/(n-1) vs 2n/(2n-1)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_resume_with_a_half_filled_reference_bank_is_bit_exact(data_root, tmp_path):
    """The reference write rule (every key, the newest kept): 4 steps straight equal 2 steps, stop, and 2
    more after a resume, bit for bit, with the bank partly filled at the checkpoint."""
    from csl_jax import checkpoint

    def config(**extra):
        c = tiny_config(data_root, sup_only_epochs=0)
        c.batch.update(labeled=16, unlabeled=16)  # one loss group of 2 on each of the 8 devices
        c.loss.group_size = 2
        c.update(log_every_steps=1, checkpoint_every_steps=2, **extra)
        c.eval.update(every_steps=4, batch_size=8, num_plot_images=0)
        return c

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(config(), straight)
    train.train_and_evaluate(config(stop_after_steps=2), resumed)
    state_2, _, _ = checkpoint.Checkpointer(resumed).restore(None)
    train.train_and_evaluate(config(), resumed)
    state_a, _ = harness.assert_same_latest_checkpoint(straight, resumed, 4)
    fill_2, fill_4 = (np.asarray(s["state"]["queue"]["fill"]) for s in (state_2, state_a))
    caps = np.asarray(build_method(config(), 5).capacities)
    assert fill_2.sum() > 0 and (fill_2 < caps).all() and (fill_4 >= fill_2).all()
