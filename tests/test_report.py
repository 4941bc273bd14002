"""csl_jax.report: the results table of workdirs. Hand-made workdir files test the aggregation, the
grouping, the options and the errors fast; four tiny real runs (two seeds of the supervised
baseline, one CSL run, one supervised run stopped early) test it on what training writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import demo
from csl_jax import data, report, run_info, train
from csl_jax import workdir as workdir_lib
from tests.test_training_run import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Hand-made workdirs
# ---------------------------------------------------------------------------------------------
def make_workdir(path, method="supervised", seed=0, final=None, evals=(), metrics=(), checkpoint=None, **overrides):
    """A workdir as a run leaves it: config.json (demo config of `method`, `overrides` as
    {'method.teacher': 'online'}), final_results.json when `final` ({evaluation: mIoU}, the first
    picks the best checkpoint), eval_results.jsonl (`evals`: (step, evaluation, mIoU)),
    metrics.jsonl (`metrics`: dicts with 'step') and checkpoints/<checkpoint>/. An `evals` entry may
    add a fourth item, the record's 'iou_per_class' ({class name: IoU})."""
    config = demo.get_config(method)
    config.seed = seed
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(workdir_lib.config_to_json(config))
    if final is not None:
        with open(os.path.join(path, "final_results.json"), "w") as f:
            json.dump({"step": 300, "total_steps": 300, "finished": True, "miou": next(iter(final.values())),
                       "evaluation": next(iter(final)), "evaluations": final, "unit": "fraction"}, f)
    with open(os.path.join(path, "eval_results.jsonl"), "w") as f:
        for step, name, miou, *per_class in evals:
            record = {"step": step, "evaluation": name, "miou": miou}
            f.write(json.dumps(dict(record, **{"iou_per_class": c for c in per_class})) + "\n")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for record in metrics:
            f.write(json.dumps(record) + "\n")
    if checkpoint is not None:
        os.makedirs(os.path.join(path, "checkpoints", str(checkpoint)))
    return str(path)


def run_report(capsys, *args):
    """(exit code, stdout, stderr) of report.main(args)."""
    code = report.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cell(values):
    """The expected table cell of mIoU fractions `values` (NumPy float64, sample std)."""
    x = 100 * np.asarray(values, np.float64)
    return f"{x.mean():.2f}" if len(x) == 1 else f"{x.mean():.2f} ± {x.std(ddof=1):.2f} ({len(x)})"


def table_rows(out):
    """{method: [cells]} of the Markdown table in the report's output."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return header, {row[2]: dict(zip(header, row)) for row in rows}


CSL_S0 = {"teacher": 0.412, "student": 0.398}
CSL_S1 = {"teacher": 0.437, "student": 0.441}
CSL_S2 = {"teacher": 0.401, "student": 0.405}


def metric_rows(steps, ratio_of_step):
    return [{"step": s, "time": 0.0, "loss": 1.0, "mask_ratio": ratio_of_step(s)} for s in steps]


@pytest.fixture()
def handmade(tmp_path):
    """runs/: CSL seeds 0, 1, 2, supervised seed 0 (finished); CSL seed 3 stopped at step 120."""
    root = tmp_path / "runs"
    for seed, final in enumerate((CSL_S0, CSL_S1, CSL_S2)):
        make_workdir(root / f"csl_s{seed}", "csl", seed, final,
                     evals=[(150, "teacher", 0.45 + seed / 100), (150, "student", 0.3),
                            (300, "teacher", final["teacher"]), (300, "student", final["student"])],
                     metrics=metric_rows(range(25, 301, 25), lambda s, seed=seed: s / 1000 + seed),
                     **{"data.root": f"/elsewhere/{seed}", "log_every_steps": 25 + seed})
    make_workdir(root / "sup_s0", "supervised", 0, {"model": 0.5234}, evals=[(300, "model", 0.5234)])
    make_workdir(root / "nested" / "csl_s3", "csl", 3, None, metrics=metric_rows((25, 50, 75, 100, 120), float),
                 checkpoint=100, stop_after_steps=120)
    (root / "nested" / "csl_s3" / ".lock").write_text("{}")  # a training run holds it
    return root


def test_table_means_sample_std_per_seed_and_unfinished(handmade, capsys, tmp_path):
    code, out, err = run_report(capsys, handmade, "--diag-steps", "100")
    assert code == 0 and err == ""
    assert out.startswith(f"$ python -m csl_jax.report {handmade} --diag-steps 100\n")
    assert "final evaluation (final_results.json)" in out
    header, rows = table_rows(out)
    assert header == ["dataset", "split", "method", "teacher val", "student val", "model val", "per seed",
                      "mask_ratio", "runs"]
    assert set(rows) == {"csl", "supervised"}
    finals = (CSL_S0, CSL_S1, CSL_S2)
    assert rows["csl"]["teacher val"] == cell([f["teacher"] for f in finals])
    assert rows["csl"]["student val"] == cell([f["student"] for f in finals])
    assert rows["csl"]["model val"] == "-"
    assert rows["csl"]["per seed"] == "teacher val: s0 41.20, s1 43.70, s2 40.10"
    assert rows["csl"]["runs"] == "3 (+1 unfinished)"  # seed 3 is not averaged in
    # mask_ratio: each run's mean over steps 225, 250, 275, 300 (the last 100), then over seeds
    per_run = [np.mean([s / 1000 + seed for s in (225, 250, 275, 300)]) for seed in range(3)]
    assert rows["csl"]["mask_ratio"] == f"{np.mean(per_run):.3f} ± {np.std(per_run, ddof=1):.3f} (3)"
    assert rows["supervised"]["model val"] == "52.34" and rows["supervised"]["per seed"] == "s0 52.34"
    assert rows["supervised"]["mask_ratio"] == "-" and rows["supervised"]["runs"] == "1"
    assert (f"- `{handmade / 'nested' / 'csl_s3'}`: synthetic 1_4 csl seed 3, step 120 of 300, checkpoint 100, "
            "locked by a training run (in progress, or it died)" in out.splitlines())

    # The JSON of --out: fractions, in the same grouping.
    code, _, _ = run_report(capsys, handmade, "--out", tmp_path / "out")
    with open(tmp_path / "out" / "report.json") as f:
        saved = json.load(f)
    [csl] = [r for r in saved["rows"] if r["method"] == "csl"]
    teacher = csl["cells"]["teacher val"]
    values = np.array([f["teacher"] for f in finals])
    assert teacher["mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert teacher["std"] == pytest.approx(values.std(ddof=1), abs=1e-12) and teacher["n"] == 3
    assert [s["seed"] for s in teacher["seeds"]] == [0, 1, 2]
    assert saved["unfinished"] == [{"dataset": "synthetic", "split": "1_4", "method": "csl", "seed": 3,
                                    "workdir": str(handmade / "nested" / "csl_s3"), "step": 120, "of": 300,
                                    "checkpoint": 100, "locked": True}]
    assert saved["command"] == f"python -m csl_jax.report {handmade} --out {tmp_path / 'out'}"


CLASSES = ("background", "disk", "square")


def test_per_class_tables(tmp_path, capsys):
    """--per-class: per dataset and evaluation, each class's IoU over the seeds' records of the
    final step (or of the best one with --select best), beside their mIoU."""
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    ious = {}  # (seed, step, evaluation) -> per-class IoU
    for seed in (0, 1):
        evals = []
        for step in (150, 300):
            for name in ("teacher", "student"):
                ious[seed, step, name] = rng.uniform(0.2, 0.9, len(CLASSES))
                evals.append((step, name, ious[seed, step, name].mean(), dict(zip(CLASSES, ious[seed, step, name]))))
        make_workdir(root / f"csl_s{seed}", "csl", seed, {n: ious[seed, 300, n].mean() for n in ("teacher", "student")},
                     evals=evals)
    sup = {"background": 0.9, "disk": 0.5, "square": 0.25}
    make_workdir(root / "sup_s0", "supervised", 0, {"model": 0.55}, evals=[(300, "model", 0.55, sup)])

    code, out, err = run_report(capsys, root, "--per-class", "--out", tmp_path / "out")
    assert code == 0 and err == ""
    blocks = out.split("Per-class IoU (%) of ")[1:]
    assert [b.split("\n")[0] for b in blocks] == [
        f"synthetic `{label}`, the final step's evaluation record (eval_results.jsonl): mean ± sample std "
        "(n seeds) over seeds." for label in ("teacher val", "student val", "model val")]
    header, rows = table_rows(blocks[0])
    assert header == ["split", "method", "mIoU", *CLASSES]
    [teacher] = [[c.strip() for c in line.strip("|").split("|")] for line in blocks[0].splitlines()
                 if line.startswith("| 1_4 ")]
    finals = np.array([ious[seed, 300, "teacher"] for seed in (0, 1)])
    assert teacher == ["1_4", "csl", cell(finals.mean(1)), *[cell(finals[:, c]) for c in range(len(CLASSES))]]
    assert teacher[2] == table_rows(out)[1]["csl"]["teacher val"]  # the same mIoU as the main table
    assert "| 1_4 | supervised | 55.00 | 90.00 | 50.00 | 25.00 |" in blocks[2]
    with open(tmp_path / "out" / "report.json") as f:
        saved = json.load(f)["per_class"]
    assert [(t["dataset"], t["evaluation"], t["classes"]) for t in saved] == [
        ("synthetic", label, list(CLASSES)) for label in ("teacher val", "student val", "model val")]
    disk = saved[1]["rows"][0]["classes"]["disk"]
    student = np.array([ious[seed, 300, "student"][1] for seed in (0, 1)])
    assert (disk["mean"], disk["std"], disk["n"]) == pytest.approx((student.mean(), student.std(ddof=1), 2))

    # --select best: the record of the best mIoU of each run
    code, out, _ = run_report(capsys, root / "csl_s0", root / "csl_s1", "--per-class", "--select", "best")
    best = [max((ious[seed, step, "student"] for step in (150, 300)), key=np.mean) for seed in (0, 1)]
    student_block = out.split("Per-class IoU (%) of synthetic `student val`, the best one's evaluation")[1]
    assert f"| 1_4 | csl | {cell(np.mean(best, 1))} | {cell([b[0] for b in best])} |" in student_block

    # A record without per-class IoU (an older run) names the file.
    old = make_workdir(tmp_path / "old", "supervised", 0, {"model": 0.5}, evals=[(300, "model", 0.5)])
    code, _, err = run_report(capsys, old, "--per-class")
    assert (code, err) == (2, f"error: {os.path.join(old, 'eval_results.jsonl')} has no 'iou_per_class' of "
                              "evaluation 'model' at step 300, which --per-class needs\n")


def test_select_best_takes_the_maximum_over_the_run(handmade, capsys):
    code, out, _ = run_report(capsys, handmade, "--select", "best", "--diag", "")
    assert code == 0 and "best evaluation over the run" in out
    header, rows = table_rows(out)
    assert "mask_ratio" not in header
    # teacher: the step-150 value 0.45 + seed / 100 beats the final one; student: the final one beats 0.3
    assert rows["csl"]["teacher val"] == cell([0.45, 0.46, 0.47])
    assert rows["csl"]["student val"] == cell([max(0.3, f["student"]) for f in (CSL_S0, CSL_S1, CSL_S2)])


def test_select_best_needs_the_evaluation_records(tmp_path, capsys):
    make_workdir(tmp_path / "a", final={"model": 0.5})
    code, out, err = run_report(capsys, tmp_path / "a", "--select", "best")
    assert code == 2 and out == ""
    assert err == (f"error: {tmp_path / 'a' / 'eval_results.jsonl'} has no record of evaluation 'model', which "
                   "--select best needs\n")


def test_different_recipes_are_separate_rows_with_a_warning(tmp_path, capsys):
    make_workdir(tmp_path / "ema_s0", "csl", 0, {"teacher": 0.30, "student": 0.2})
    make_workdir(tmp_path / "ema_s1", "csl", 1, {"teacher": 0.32, "student": 0.2}, log_every_steps=1,
                 **{"data.num_workers": 3})  # not recipe settings: merged
    make_workdir(tmp_path / "online_s0", "csl", 0, {"teacher": 0.40, "student": 0.2}, **{"method.teacher": "online"})
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0
    assert err == ("warning: synthetic 1_4 csl: the runs differ in config.method.teacher; not averaged together, "
                   "one row per recipe\n")
    _, rows = table_rows(out)
    assert set(rows) == {"csl (method.teacher=ema)", "csl (method.teacher=online)"}
    assert rows["csl (method.teacher=ema)"]["teacher val"] == cell([0.30, 0.32])
    assert rows["csl (method.teacher=online)"]["teacher val"] == "40.00"


def test_a_seed_finished_twice_is_warned_and_counted_twice(tmp_path, capsys):
    make_workdir(tmp_path / "a", seed=0, final={"model": 0.3})
    make_workdir(tmp_path / "b", seed=0, final={"model": 0.4})
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0
    assert err == (f"warning: synthetic 1_4 supervised: seed(s) [0] finished in more than one workdir "
                   f"({tmp_path / 'a'}, {tmp_path / 'b'}); each counts as a replicate\n")
    assert table_rows(out)[1]["supervised"]["per seed"] == "s0 30.00, s0 40.00"


def test_many_differing_settings_are_labelled_by_a_hash(tmp_path, capsys):
    make_workdir(tmp_path / "a", "csl", 0, {"teacher": 0.3})
    make_workdir(tmp_path / "b", "csl", 1, {"teacher": 0.4},
                 **{"method.alpha": 2.0, "method.teacher": "online", "method.variance_scaling": True,
                    "method.second_view": "cutmix"})
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0
    assert ("config.method.alpha, config.method.second_view, config.method.teacher, config.method.variance_scaling"
            in err)
    _, rows = table_rows(out)
    labels = sorted(rows)
    assert len(labels) == 2 and all(label.startswith("csl (recipe ") and len(label) == len("csl (recipe 123456)")
                                    for label in labels)


def test_variant_names_the_row_and_datasets_splits_are_separate(tmp_path, capsys):
    make_workdir(tmp_path / "a", "csl", 0, {"teacher": 0.3}, **{"method.variant": "csl_released"})
    make_workdir(tmp_path / "b", "supervised", 0, {"model": 0.2})
    make_workdir(tmp_path / "c", "supervised", 0, {"model": 0.25}, **{"data.split": "1_8"})
    # a variant that does not name its method (UniMatch V2's 'csl') is not CSL's row
    make_workdir(tmp_path / "d", "csl", 0, {"teacher": 0.4}, **{"method.name": "unimatch_v2", "method.variant": "csl"})
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0 and err == ""
    rows = [line.split(" | ")[:3] for line in out.splitlines() if line.startswith("| synthetic")]
    assert rows == [["| synthetic", "1_4", "csl_released"], ["| synthetic", "1_4", "supervised"],
                    ["| synthetic", "1_4", "unimatch_v2_csl"], ["| synthetic", "1_8", "supervised"]]


def test_evaluation_labels_name_split_and_a_non_default_protocol(tmp_path, capsys):
    make_workdir(tmp_path / "a", final={"model": 0.3, "model@test": 0.25, "model@val:sliding": 0.31})
    code, out, _ = run_report(capsys, tmp_path / "a")
    header, rows = table_rows(out)
    assert header[3:6] == ["model val", "model test", "model val sliding"]
    assert [rows["supervised"][h] for h in header[3:6]] == ["30.00", "25.00", "31.00"]


def test_errors_name_the_folder_or_file(tmp_path, capsys):
    code, out, err = run_report(capsys, tmp_path / "missing")
    assert (code, out, err) == (2, "", f"error: {tmp_path / 'missing'}: no such folder\n")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, _, err = run_report(capsys, tmp_path / "empty")
    assert (code, err) == (2, f"error: {tmp_path / 'empty'}: no workdir (a folder with config.json) in it\n")

    bad = make_workdir(tmp_path / "bad", final={"model": 0.3})
    with open(os.path.join(bad, "final_results.json"), "w") as f:
        f.write('{"step": 3,')
    code, _, err = run_report(capsys, bad)
    assert code == 2 and err.startswith(f"error: {os.path.join(bad, 'final_results.json')} is not valid JSON (")
    assert err.count("\n") == 1
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write("{")
    code, _, err = run_report(capsys, bad)
    assert code == 2 and err.startswith(f"error: {os.path.join(bad, 'config.json')} is not valid JSON (")

    torn = make_workdir(tmp_path / "torn", final={"model": 0.3}, metrics=metric_rows((1, 2), float))
    with open(os.path.join(torn, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "mask')  # the torn last line of a killed run: ignored
    code, out, _ = run_report(capsys, torn)
    assert code == 0 and table_rows(out)[1]["supervised"]["mask_ratio"] == "1.500"  # the mean of steps 1 and 2
    with open(os.path.join(torn, "metrics.jsonl"), "a") as f:
        f.write('\n{"step": 4}\n')
    code, _, err = run_report(capsys, torn)
    assert code == 2 and err.startswith(f"error: {os.path.join(torn, 'metrics.jsonl')} line 3 is not valid JSON (")

    code, _, err = run_report(capsys, tmp_path / "missing_too", "--diag", "x")
    assert code == 2 and "missing_too" in err
    good = make_workdir(tmp_path / "good", final={"model": 0.3}, metrics=metric_rows((1,), float))
    code, _, err = run_report(capsys, good, "--diag", "mask_ratio,nope")
    assert (code, err) == (2, "error: --diag nope: no finished run's metrics.jsonl has it; logged keys: loss, "
                              "mask_ratio\n")


# ---------------------------------------------------------------------------------------------
# Real tiny runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from data_prep import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.prepare(root, num_train=32, num_val=4, image_size=(40, 40), seed=0)
    return str(root)


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """runs/: supervised seeds 0 and 1 and CSL seed 0 (6 steps, evaluated at 3 and 6), and
    supervised seed 2 stopped after 3 steps; recorded as main.py records them."""
    root = tmp_path_factory.mktemp("runs")
    for name, method, seed, extra in [("sup_s0", "supervised", 0, {}), ("sup_s1", "supervised", 1, {}),
                                      ("sup_s2", "supervised", 2, {"stop_after_steps": 3}),
                                      ("csl_s0", "csl", 0, {"loss.group_size": 2})]:
        config = tiny_config(data_root, method, **{"seed": seed, "eval.every_steps": 3, **extra})
        workdir = str(root / "camvid_like" / name)
        run_info.prepare(config, workdir, "train")
        train.train_and_evaluate(config, workdir)
    return root


def final_results(workdir):
    with open(os.path.join(workdir, "final_results.json")) as f:
        return json.load(f)


def test_report_of_tiny_runs(runs, capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_report(capsys, runs, "--out", out_dir)
    assert code == 0, err
    header, rows = table_rows(out)
    assert header == ["dataset", "split", "method", "teacher val", "student val", "model val", "per seed",
                      "mask_ratio", "pl_acc_reliable", "pl_acc_rest", "runs"]
    sup = [final_results(runs / "camvid_like" / f"sup_s{seed}")["evaluations"]["model"] for seed in (0, 1)]
    assert rows["supervised"]["model val"] == cell(sup)
    assert rows["supervised"]["per seed"] == f"s0 {100 * sup[0]:.2f}, s1 {100 * sup[1]:.2f}"
    assert rows["supervised"]["runs"] == "2 (+1 unfinished)"
    csl = final_results(runs / "camvid_like" / "csl_s0")["evaluations"]
    assert rows["csl"]["teacher val"] == cell([csl["teacher"]]) and rows["csl"]["student val"] == cell([csl["student"]])
    metrics = [json.loads(line) for line in open(runs / "camvid_like" / "csl_s0" / "metrics.jsonl")]
    ratio = np.mean([m["mask_ratio"] for m in metrics if "mask_ratio" in m])  # 6 steps < the last 100
    assert rows["csl"]["mask_ratio"] == f"{ratio:.3f}"
    assert (f"- `{runs / 'camvid_like' / 'sup_s2'}`: synthetic 1_2 supervised seed 2, step 3 of 6, checkpoint 3"
            in out.splitlines())

    with open(out_dir / "report.json") as f:
        saved = json.load(f)
    [row] = [r for r in saved["rows"] if r["method"] == "supervised"]
    assert row["cells"]["model val"]["mean"] == pytest.approx(np.mean(sup), abs=1e-12)
    assert row["cells"]["model val"]["std"] == pytest.approx(np.std(sup, ddof=1), abs=1e-12)
    with open(out_dir / "miou_over_steps.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(out_dir / "miou_over_steps.png") as image:
        image.verify()
        assert image.size == (3 * 550, 400)  # three evaluations side by side, 5.5 x 4 in at 100 dpi

    # --per-class: the dataset's class names, each seed's record of the last step
    code, out, _ = run_report(capsys, runs / "camvid_like" / "sup_s0", runs / "camvid_like" / "sup_s1", "--per-class")
    config = workdir_lib.load_config(str(runs / "camvid_like" / "sup_s0" / "config.json"))
    names = list(data.dataset_info(config.data).class_names)
    header, rows = table_rows(out.split("Per-class IoU (%) of ")[1])
    records = [[json.loads(line) for line in open(runs / "camvid_like" / f"sup_s{seed}" / "eval_results.jsonl")][-1]
               for seed in (0, 1)]
    assert header == ["split", "method", "mIoU", *names] and all(r["step"] == 6 for r in records)
    [row] = rows.values()  # one row (table_rows keys rows by their third cell, here the mIoU)
    assert (row["method"], row["mIoU"]) == ("supervised", cell(sup))
    assert [row[c] for c in names] == [cell([r["iou_per_class"][c] for r in records]) for c in names]


def test_module_entry_point_exit_codes(runs, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "csl_jax.report", str(runs / "camvid_like" / "csl_s0")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"$ python -m csl_jax.report {runs / 'camvid_like' / 'csl_s0'}\n")
    missing = subprocess.run([sys.executable, "-m", "csl_jax.report", str(tmp_path / "nowhere")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert (missing.returncode, missing.stdout, missing.stderr) == (2, "", f"error: {tmp_path / 'nowhere'}: no such "
                                                                            "folder\n")
