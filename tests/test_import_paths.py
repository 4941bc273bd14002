"""Old import paths keep working: each is the very same object as its new home (`is`), and the
deprecated aliases warn.

The method folders (issue 24): csl_jax/methods/<name>/ holds the method (`__init__.py`) and its own
pieces, which used to sit in csl_jax/methods/parts/ as `<name>_*.py`. Those old modules are now
aliases that bind the old name to the new module object (so registrations run once and monkeypatching
through either name reaches both) and emit a DeprecationWarning. Other kept names: `methods.semi`
(former name of weak_to_strong), `csl_jax.pseudo_labels` (public alias of parts.pseudo_labels),
`csl_jax.models.convert.from_unimatch`.
"""

import ast
import importlib
import json
import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: deprecated module -> its new home.
MOVED = {
    "csl_jax.methods.parts.u2pl_contrastive": "csl_jax.methods.u2pl.contrastive",
    "csl_jax.methods.parts.u2pl_queue": "csl_jax.methods.u2pl.queue",
    "csl_jax.methods.parts.u2pl_unsup": "csl_jax.methods.u2pl.unsup",
    "csl_jax.methods.parts.u2pl_data": "csl_jax.methods.u2pl.data",
    "csl_jax.methods.parts.css_losses": "csl_jax.methods.css.losses",
    "csl_jax.methods.parts.css_targets": "csl_jax.methods.css.targets",
    "csl_jax.methods.parts.css_data": "csl_jax.methods.css.data",
    "csl_jax.methods.parts.cpcl_losses": "csl_jax.methods.cpcl.losses",
    "csl_jax.methods.parts.cpcl_data": "csl_jax.methods.cpcl.data",
    "csl_jax.methods.parts.ccvc_losses": "csl_jax.methods.ccvc.losses",
}
METHOD_FOLDERS = ("u2pl", "css", "cpcl", "ccvc")
#: names configs/, tests/ and benchmarks/ use on the method modules.
PUBLIC = {
    "u2pl": ("NAME", "U2PL", "VARIANTS", "configure", "default_options", "check_options", "option_ranges"),
    "css": ("NAME", "CSS", "configure", "default_options", "check_options", "option_ranges"),
    "cpcl": ("NAME", "CPCL", "configure", "default_options", "check_options", "option_ranges"),
    "ccvc": ("CCVC", "configure", "default_options", "check_options", "option_ranges"),
}
#: what each method's data module registers with the pipeline: (geometries, views).
REGISTERED = {
    "csl_jax.methods.u2pl.data": (("u2pl", "u2pl_pad0"), ("u2pl_box",)),
    "csl_jax.methods.css.data": (("css_labeled_rescale", "css_labeled", "css_unlabeled"),
                                 ("css_photometric", "css_strong")),
    "csl_jax.methods.cpcl.data": (("cpcl",), ("cpcl_mask",)),
}


def _import_quietly(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(name)


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_part_module_is_the_new_module(old, new):
    module = _import_quietly(old)
    assert module is importlib.import_module(new)
    assert sys.modules[old] is sys.modules[new] is module
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is module
    # `from csl_jax.methods.<name> import <part>` (a package attribute) is the same module too.
    package, _, part = new.rpartition(".")
    assert getattr(importlib.import_module(package), part) is module
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(f"import {old} as via_import\nfrom {parent} import {leaf} as via_from", namespace)
    assert namespace["via_import"] is namespace["via_from"] is module


@pytest.mark.parametrize("name", METHOD_FOLDERS)
def test_method_modules_are_packages_with_their_public_names(name):
    from csl_jax import methods
    from csl_jax.methods import ccvc, cpcl, css, u2pl

    module = {"u2pl": u2pl, "css": css, "cpcl": cpcl, "ccvc": ccvc}[name]
    assert module is sys.modules[f"csl_jax.methods.{name}"] is importlib.import_module(f"csl_jax.methods.{name}")
    assert hasattr(module, "__path__") and pathlib.Path(module.__file__).name == "__init__.py"
    for attr in PUBLIC[name]:
        assert hasattr(module, attr), f"csl_jax.methods.{name}.{attr}"
    cls = getattr(module, name.upper())
    assert methods.METHODS[name] is cls
    assert cls.__module__ == module.configure.__module__ == module.default_options.__module__ == module.__name__


def test_method_package_attributes_name_their_own_parts():
    """`csl_jax.methods.ccvc.losses` is CCVC's losses (not the shared parts.losses the method also uses)."""
    shared = importlib.import_module("csl_jax.methods.parts.losses")
    for new in MOVED.values():
        package, _, part = new.rpartition(".")
        assert getattr(importlib.import_module(package), part) is sys.modules[new] is not shared


def test_shared_helpers_have_one_home():
    from csl_jax.data import transforms
    from csl_jax.methods.parts import resize

    contrastive = importlib.import_module("csl_jax.methods.u2pl.contrastive")
    u2pl_data = importlib.import_module("csl_jax.methods.u2pl.data")
    assert contrastive.downsample_nearest is resize.downsample_nearest
    assert contrastive.nearest_indices is resize.nearest_indices
    assert u2pl_data.cutout_box is transforms.cutout_box


def _imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_no_method_folder_imports_another_and_nothing_uses_the_aliases():
    bad = []
    for name in METHOD_FOLDERS:
        for path in sorted((ROOT / "csl_jax" / "methods" / name).glob("*.py")):
            for module in _imported_modules(path):
                others = [o for o in METHOD_FOLDERS if o != name]
                if any(module == f"csl_jax.methods.{o}" or module.startswith(f"csl_jax.methods.{o}.") for o in others):
                    bad.append(f"{path.relative_to(ROOT)}: {module}")
    aliases = {ROOT / (old.replace(".", "/") + ".py") for old in MOVED}
    sources = [p for d in ("csl_jax", "configs", "benchmarks", "data_prep") for p in (ROOT / d).rglob("*.py")]
    for path in sorted(set(sources + [ROOT / "main.py"]) - aliases):
        bad += [f"{path.relative_to(ROOT)}: {m}" for m in _imported_modules(path) if m in MOVED]
    assert not bad


def test_semi_pseudo_labels_and_convert_keep_their_names():
    from csl_jax import pseudo_labels
    from csl_jax.methods import semi, weak_to_strong
    from csl_jax.methods.parts import pseudo_labels as parts_pseudo_labels
    from csl_jax.models.convert import from_unimatch

    for attr in ("WeakToStrong", "METHODS", "check_options", "default_options"):
        assert getattr(semi, attr) is getattr(weak_to_strong, attr)
    assert pseudo_labels.csl_weights is parts_pseudo_labels.csl_weights
    for attr in parts_pseudo_labels.__all__:
        assert getattr(pseudo_labels, attr) is getattr(parts_pseudo_labels, attr)
    assert callable(from_unimatch)
    assert getattr(sys.modules[from_unimatch.__module__], "from_unimatch") is from_unimatch


_SCRIPT = r"""
import importlib, json, sys, warnings
from collections import Counter

from csl_jax.data import transforms, views

counts = Counter()
_geometry, _view = transforms.register_geometry, views.register_view
def register_geometry(name, *args, **kwargs):
    counts["geometry:" + name] += 1
    return _geometry(name, *args, **kwargs)
def register_view(name, *args, **kwargs):
    counts["view:" + name] += 1
    return _view(name, *args, **kwargs)
transforms.register_geometry, views.register_view = register_geometry, register_view

moved, registered, new_first = json.loads(sys.argv[1])
report = {"warned": {}, "same": {}, "internal": []}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if new_first:
        for new in moved.values():
            importlib.import_module(new)
        import configs.ccvc_pascal, configs.cpcl_cityscapes, configs.css_pascal, configs.u2pl_pascal  # noqa
        report["internal"] = [str(w.message) for w in caught if "csl_jax.methods.parts." in str(w.message)]
    for old, new in moved.items():
        del caught[:]
        exec(compile("import " + old, "importer.py", "exec"), {})
        module = sys.modules[old]
        report["warned"][old] = [(w.category.__name__, str(w.message), w.filename) for w in caught
                                 if old in str(w.message)]
        report["same"][old] = module is importlib.import_module(new)
report["counts"] = dict(counts)
report["fn_ok"] = {}
for new, (geometries, view_names) in registered.items():
    module = sys.modules[new]
    report["fn_ok"][new] = all(views.VIEWS[v].fn.__module__ == new and getattr(module, views.VIEWS[v].fn.__name__)
                               is views.VIEWS[v].fn for v in view_names)
print(json.dumps(report))
"""


@pytest.mark.parametrize("new_first", [False, True], ids=["old_path_first", "new_path_first"])
def test_aliases_warn_and_register_once(new_first):
    """In a fresh interpreter (so the warnings are observable): importing each old path warns once with
    a DeprecationWarning naming the new path, at the importing line; every registration of a method's
    data module happens exactly once whichever path comes first; nothing in csl_jax or configs
    imports an alias."""
    registered = {k: [list(g), list(v)] for k, (g, v) in REGISTERED.items()}
    arg = json.dumps([MOVED, registered, new_first])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, arg], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["internal"] == []
    for old, new in MOVED.items():
        assert report["same"][old], old
        warned = report["warned"][old]
        assert len(warned) == 1, (old, warned)
        category, message, filename = warned[0]
        assert category == "DeprecationWarning" and old in message and new in message
        assert filename == "importer.py"  # the importing line, not the alias module or importlib
    expected = {}
    for geometries, view_names in REGISTERED.values():
        expected.update({f"geometry:{name}": 1 for name in geometries})
        expected.update({f"view:{name}": 1 for name in view_names})
    assert {k: report["counts"].get(k, 0) for k in expected} == expected
    assert all(report["fn_ok"].values()), report["fn_ok"]


def test_alias_import_fails_under_error_filter():
    """`python -W error::DeprecationWarning` turns an old-path import into an error; the new path imports."""
    old, new = "csl_jax.methods.parts.u2pl_data", "csl_jax.methods.u2pl.data"
    code = (f"import {new}, warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as e:\n    print('raised', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("raised") and new in proc.stdout
