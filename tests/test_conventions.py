"""One definition of each shared name (the ignore label, the mesh axis, the PyTree alias, the tiny
model), and method/protocol documents cited where users have them.

The checks read the source (ast, text), so a second definition fails here even when its value agrees.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import csl_jax.data.sources
import csl_jax.data.transforms
import csl_jax.methods.parts.losses
import csl_jax.visualize
import data_prep.common
from configs import common, demo
from csl_jax import constants, parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Library, data preparation, configs, benchmarks and the entry point; tests keep their own literal
# 255 in independent NumPy references on purpose.
SOURCES = sorted(p for d in ("csl_jax", "data_prep", "configs", "benchmarks") for p in (ROOT / d).rglob("*.py"))
SOURCES.append(ROOT / "main.py")


def _definitions():
    """(file, name, value node) of every module-level or class-level `NAME = <expr>` assignment."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        yield str(path.relative_to(ROOT)), target.id, node.value


def _is_literal(node, value):
    return isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value


def test_shared_names_are_defined_once():
    found = set()
    for file, name, value in _definitions():
        if _is_literal(value, 255) and "IGNORE" in name.upper():
            found.add((file, "IGNORE"))
        if name == "AXIS" and _is_literal(value, "data"):
            found.add((file, "AXIS"))
        if name == "PyTree" and isinstance(value, ast.Name) and value.id == "Any":
            found.add((file, "PyTree"))
    homes = {("csl_jax/constants.py", "IGNORE"), ("csl_jax/parallel.py", "AXIS"), ("csl_jax/constants.py", "PyTree")}
    assert found == homes


def test_no_ignore_label_literal_in_defaults_or_masks():
    """`ignore_index=255`-style defaults and `np.where(valid, 0, 255)` masks use IGNORE_INDEX."""
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                params = node.posonlyargs + node.args
                pairs = list(zip(params[len(params) - len(node.defaults):], node.defaults))
                pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
                bad += [f"{path.name}:{d.lineno} {a.arg}=255" for a, d in pairs
                        if _is_literal(d, 255) and ("ignore" in a.arg or "label" in a.arg)]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "where"
                    and any(_is_literal(a, 255) for a in node.args)):
                bad.append(f"{path.name}:{node.lineno} where(..., 255)")
            if isinstance(node, ast.Compare) and any(_is_literal(c, 255) for c in [node.left, *node.comparators]):
                bad.append(f"{path.name}:{node.lineno} comparison with 255")
    assert not bad


def test_old_names_still_import_and_agree():
    assert constants.IGNORE_INDEX == 255
    assert (csl_jax.methods.parts.losses.IGNORE_INDEX == csl_jax.visualize.IGNORE_INDEX
            == csl_jax.data.transforms.IGNORE
            == csl_jax.data.sources.IGNORE == data_prep.common.IGNORE == csl_jax.data.sources.DatasetInfo(
                "x", 1, ("a",)).ignore_index == constants.IGNORE_INDEX)
    assert parallel.AXIS == "data"


def test_tiny_model_has_one_definition():
    c = common.tiny_model(common.get_base_config(), width=4)
    assert (c.model.blocks, c.model.width, c.model.head_width, c.model.reduce_width) == ((1, 1, 1, 1), 4, 32, 8)
    assert {k: demo.get_config().model[k] for k in common.TINY_MODEL} == common.TINY_MODEL
    with pytest.raises(ValueError, match=r"tiny_model overrides \['depth'\] are not fields of TINY_MODEL"):
        common.tiny_model(common.get_base_config(), depth=50)
    # Nobody else spells out a tiny config model: `c.model.blocks = ...`, `c.model.update(blocks=...)`
    # or a {blocks, head_width, ...} dict of config fields (modules built directly in the model tests
    # and the converter's CLI arguments are not configs).
    spelled = []
    for path in sorted((ROOT / "tests").glob("*.py")) + SOURCES:
        if path == ROOT / "configs" / "common.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign):
                hit = any(isinstance(t, ast.Attribute) and t.attr == "blocks" for t in node.targets)
            elif isinstance(node, ast.Call):
                keys = {k.arg for k in node.keywords}
                hit = "blocks" in keys and (getattr(node.func, "attr", "") == "update" or "head_width" in keys)
            elif isinstance(node, ast.Dict):
                hit = {"blocks", "head_width"} <= {k.value for k in node.keys if isinstance(k, ast.Constant)}
            else:
                hit = False
            if hit and "(1, 1, 1, 1)" in ast.unparse(node):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not spelled


# `protocol.md`, `csl.md`, `docs/methods/unimatch.md`, `(../protocol.md)` ..., optionally followed by §N.
_CITATION = re.compile(r"(?<![\w-])((?:\.\./|docs/)?(?:methods/)?(protocol|csl|unimatch|u2pl|ccvc|css|cpcl)\.md)"
                       r"\)?(?:\s*§(\d+))?")


def test_cited_method_and_protocol_docs_are_in_the_repository():
    """Every citation of the protocol or a method document resolves to docs/ (and its § to a heading)."""
    texts = sorted((ROOT / "tests").glob("*.py")) + SOURCES + sorted((ROOT / "docs").rglob("*.md"))
    texts.append(ROOT / "README.md")
    cited, broken = 0, []
    for path in texts:
        text = path.read_text()
        broken += [f"{path.relative_to(ROOT)}: {m.group(0)}"
                   for m in re.finditer(r"shared/docs/(protocol|methods)", text)]
        for m in _CITATION.finditer(text):
            doc = ROOT / "docs" / ("protocol.md" if m.group(2) == "protocol" else f"methods/{m.group(2)}.md")
            cited += 1
            if not doc.is_file():
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)} (no {doc.relative_to(ROOT)})")
            elif m.group(3) and not re.search(rf"^## {m.group(3)}\. ", doc.read_text(), re.M):
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)} (no section {m.group(3)})")
    assert cited > 20 and not broken


def test_ruff_check_is_clean():
    """The repository's one style (pyproject.toml [tool.ruff]): pycodestyle, pyflakes, 120 columns."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
