"""Every command of README.md and docs/usage.md, run as a newcomer pastes it, in order, in a fresh
folder that looks like the repository root (main.py and configs/ linked, a `photos/` folder of their own
images). Commands on the demo run (runs/demo ...) run in full and must succeed. Commands that need a
dataset or a file under /data or a checkpoint the reader has (`unimatch_best.pth`) run up to the point
where they would read it: training, eval and predict commands with `--mode=config` appended (the config,
the split, the overrides are checked), the others must end in one `error:` line naming the missing path."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/usage.md")


def documented_commands(path: pathlib.Path) -> list[str]:
    """The `python ...` command lines of the code blocks (indented by 4+ spaces, or fenced) of `path`;
    of a `python3 -m venv .venv && ... && .venv/bin/python X` line, `python X`."""
    commands, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        line = line.strip()
        if line.startswith("python3 -m venv"):
            line = "python " + line.split("&& .venv/bin/python ")[-1]
        if line.startswith("python ") and not line.startswith("python -m pytest"):
            commands.append(line)
    return commands


def needs_the_readers_files(args: list[str]) -> bool:
    return any("/data/" in a or "unimatch_best.pth" in a for a in args)


def write_photos(folder: pathlib.Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("street.jpg", (48, 64, 3)), ("room.png", (40, 40, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)


def test_the_docs_list_their_commands():
    commands = {doc: documented_commands(ROOT / doc) for doc in DOCS}
    assert "python main.py --config=configs/demo.py --workdir=runs/demo" in commands["README.md"]
    assert len(commands["docs/usage.md"]) > 15, commands


def test_every_documented_command_runs_as_pasted(tmp_path):
    for name in ("main.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    write_photos(tmp_path / "photos")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["CSL_JAX_WEIGHTS_DIR"] = str(tmp_path / "weights")  # nothing is downloaded: the /data commands stop first
    failures = []
    for doc in DOCS:
        for command in documented_commands(ROOT / doc):
            args = shlex.split(command)
            assert args[0] == "python", command
            readers = needs_the_readers_files(args)
            if readers and args[1] == "main.py":
                args.append("--mode=config")
            proc = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                                  env=env, timeout=900)
            lines = proc.stderr.strip().splitlines()
            if readers and args[1] != "main.py":  # stops at the first path it cannot read
                ok = (proc.returncode in (1, 2) and "Traceback" not in proc.stderr and lines
                      and lines[-1].startswith("error: ") and re.search(r"/data/|unimatch_best\.pth", lines[-1]))
            else:
                ok = proc.returncode == 0 and "Traceback" not in proc.stderr
            if not ok:
                failures.append(f"{doc}: {command}\n  rc {proc.returncode}: {proc.stderr[-1500:]}")
    assert not failures, "\n".join(failures)
    # what the demo commands left: a finished run evaluated, masks of the reader's photos, a report
    assert (tmp_path / "runs/demo/final_results.json").is_file()
    assert (tmp_path / "runs/demo/eval_best.json").is_file()
    assert sorted(os.listdir(tmp_path / "runs/demo_masks")) == sorted(
        f"{stem}_{kind}.png" for stem in ("street", "room") for kind in ("mask", "color", "overlay"))
    assert (tmp_path / "runs/report/report.json").is_file()
