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
_CITATION = re.compile(r"(?<![\w-])((?:\.\./|docs/)?(?:methods/)?"
                       r"(protocol|csl|unimatch_v2|unimatch|u2pl|ccvc|css|cpcl)\.md)\)?(?:\s*§(\d+))?")


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


# ----------------------------------------------------------------------------- imports inside csl_jax
# The layers of csl_jax, lowest first: a module imports modules of its own layer or of
# lower ones, never of a higher one: at module level or inside a function, `import`, `from ... import`
# or importlib.import_module('csl_jax....'). A module's layer is that of its longest listed prefix
# (`csl_jax.evaluation.modes` is 6, the rest of `csl_jax.evaluation` 3); a new module that matches no
# entry fails test_every_module_has_a_layer until it is placed here.
LAYERS = {
    # 0 leaves: names, device helpers, the train state, optimiser, checkpoint files, metric logs
    "csl_jax": 0, "csl_jax.constants": 0, "csl_jax.parallel": 0, "csl_jax.state": 0, "csl_jax.optim": 0,
    "csl_jax.checkpoint": 0, "csl_jax.metrics_writer": 0,
    # 1 input pipeline
    "csl_jax.data": 1,
    # 2 networks, their registry and checkpoint converters; drawing label maps
    "csl_jax.models": 2, "csl_jax.visualize": 2,
    # 3 evaluation machinery that knows no method: protocols, evaluator, metrics, the eval loop
    "csl_jax.evaluation": 3,
    # 4 settings checks (they parse the evaluation strings and model dtypes; methods use is_number)
    "csl_jax.config_checks": 4,
    # 5 methods (networks + losses + predict functions) and their shared parts
    "csl_jax.methods": 5,
    # 6 what wires a method to checkpoints: --mode=eval/predict; the workdir (its recipe names the method)
    "csl_jax.evaluation.modes": 6, "csl_jax.workdir": 6,
    # 7 run records and reports
    "csl_jax.run_info": 7, "csl_jax.report": 7,
    # 8 the trainer (main.py, benchmarks and tests sit above csl_jax)
    "csl_jax.train": 8,
}
# Modules kept only so that old import paths work: they re-export the module they name, whatever its layer.
ALIASES = {"csl_jax.pseudo_labels": "csl_jax.methods.parts.pseudo_labels",
           "csl_jax.methods.semi": "csl_jax.methods.weak_to_strong"}
PACKAGE = ROOT / "csl_jax"


def _module_names():
    """{dotted name: file} of every module of csl_jax (a package is its __init__.py)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(name, path, modules):
    """(line, imported module) of every csl_jax import in `path` (module `name`), anywhere in the file.

    `from P import x` names P.x when P.x is a module (a file or a package), else P itself; the implicit
    import of parent packages is not counted (importing P.x runs P/__init__.py first, but what P
    imports is P's own edge).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "csl_jax")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "csl_jax":
                continue
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).startswith("csl_jax")):
            yield node.lineno, node.args[0].value


def _import_graph():
    """{module: {imported module: first line}} of csl_jax, self-imports left out."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for line, target in _imports(name, path, modules):
            assert target in modules, f"{path.relative_to(ROOT)}:{line} imports {target}, which is not a module"
            if target != name:
                edges.setdefault(target, line)
    return graph


def _find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer(name):
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def test_the_cycle_finder_and_the_import_reader_work():
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 2}}) is None
    graph = _import_graph()
    assert graph["csl_jax.models.pretrained"]["csl_jax.models.convert"]  # `from csl_jax.models import convert`
    assert "csl_jax.evaluation.loop" in graph["csl_jax.train"]  # inside a function
    assert "csl_jax.methods" in graph["csl_jax.train"]  # `from csl_jax.methods import Method`: the package


def test_csl_jax_has_no_import_cycle():
    """No csl_jax module imports itself through others, with imports inside functions counted:
    a circle works only because an import is deferred, and breaks when someone moves it up."""
    graph = _import_graph()
    cycle = _find_cycle(graph)
    where = [f"{a} -> {b} ({_module_names()[a].relative_to(ROOT)}:{graph[a][b]})"
             for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle:\n  " + "\n  ".join(where)


def test_every_module_has_a_layer():
    modules = _module_names()
    assert not [name for name in modules if _layer(name) is None and name not in ALIASES]
    assert not [name for name in list(LAYERS) + list(ALIASES) + list(ALIASES.values()) if name not in modules]


def test_no_module_imports_a_higher_layer():
    graph, files = _import_graph(), _module_names()
    upward = [f"{files[a].relative_to(ROOT)}:{line} {a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, edges in sorted(graph.items()) if a not in ALIASES
              for b, line in sorted(edges.items()) if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)
    for alias, target in ALIASES.items():
        assert set(graph[alias]) == {target}, f"{alias} is an alias: it imports {target} only"
