"""Read PyTorch checkpoints (`torch.save` files) as NumPy, without torch and without running code.

    from csl_jax.models import torch_pickle
    checkpoint = torch_pickle.load("resnet101.pth")  # what torch.load gives, tensors as np.ndarray

Both formats torch.save writes are read:
  zip (torch >= 1.6, the default): `<dir>/data.pkl` pickles the object; each tensor's storage is
      the record `<dir>/data/<key>`, raw bytes in the order of `<dir>/byteorder` (native if absent).
  legacy (`_use_new_zipfile_serialization=False`, torch < 1.6): five pickles in a row (magic
      number, protocol 1001, sys_info, the object, the sorted storage keys), then per key an int64
      element count and the raw storage bytes, little-endian.
A pickled tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose
storage comes through persistent_load as ('storage', torch.<T>Storage, key, location, numel[, None])
(a non-None sixth item, a storage view of torch < 1.0, is not read).

Safety: the unpickler resolves only the globals a weights file needs (a subset of what
torch.load(weights_only=True) allows, plus the NumPy ones a CSS checkpoint holds):
collections.OrderedDict, the tensor and parameter rebuild functions, the storage types,
`_codecs.encode` of latin-1 text (how protocol 2 pickles bytes) and NumPy's array/scalar
reconstruction with numeric dtypes. Each is a stand-in that only records or checks data; any other
global raises UnsafeCheckpointError naming it, before anything is imported or called. Tensor views
are bounds-checked against their storage before they are copied.

Returned: the checkpoint's dicts (OrderedDicts stay OrderedDicts), lists and tuples, with each
tensor as a C-contiguous np.ndarray of its dtype (bfloat16 as ml_dtypes.bfloat16) and shape, never
aliasing another; NumPy arrays (native byte order) and scalars as NumPy unpickles them; other
leaves unchanged.
"""
from __future__ import annotations

import collections
import pickle
import sys
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}
_NUMPY_KINDS = "biufc"  # bool, int, uint, float, complex: no object, string, void or structured dtypes


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle names a global outside the weights-only set."""


class _StorageType(NamedTuple):
    """torch.<name> (a storage class) as pickled in a persistent id."""
    name: str


class _StorageRef(NamedTuple):
    """The storage `key` (its dtype and element count are in the unpickler's `storages`)."""
    key: str


class _Tensor(NamedTuple):
    """A tensor still to be cut from its storage (element offset, size, stride): cut after unpickling,
    as a legacy file's storages follow its pickle."""
    storage: Any
    offset: Any
    size: Any
    stride: Any


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata are dropped."""
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data."""
    return data


def _encode(text, encoding="utf-8"):
    """_codecs.encode as protocol 2 uses it for bytes: (latin-1 text, 'latin1') -> bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise ValueError(f"unexpected _codecs.encode call with encoding {encoding!r}")
    return text.encode("latin1")


class _NumpyDType:
    """numpy.dtype(spec, align, copy) then its pickled state: a numeric dtype and its byte order only."""
    __slots__ = ("dtype",)

    def __init__(self, spec, align=False, copy=True):
        self.dtype = np.dtype(spec) if isinstance(spec, str) else None
        if self.dtype is None or self.dtype.kind not in _NUMPY_KINDS:
            raise ValueError(f"NumPy dtype {spec!r} is not a plain numeric type")

    def __setstate__(self, state):
        byteorder, extra = state[1], state[2:5]  # (version, byteorder, subarray, names, fields, ...)
        if byteorder not in ("<", ">", "|", "=") or any(item is not None for item in extra):
            raise ValueError(f"NumPy dtype state {state!r} is not a plain numeric type")
        self.dtype = self.dtype.newbyteorder(byteorder) if byteorder in "<>" else self.dtype


_NDARRAY = object()  # numpy.ndarray, only as _reconstruct's first argument


class _NumpyArray:
    """numpy's _reconstruct(ndarray, ...) then its state (version, shape, dtype, fortran order, bytes)."""
    __slots__ = ("array",)

    def __setstate__(self, state):
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
            raise ValueError("a NumPy array whose state is not a numeric dtype and raw bytes")
        array = np.frombuffer(data, dtype.dtype).reshape(shape, order="F" if fortran else "C")
        self.array = array.astype(array.dtype.newbyteorder("="), order="K")  # a native copy, as NumPy 2 gives


def _reconstruct(subtype, *_):
    if subtype is not _NDARRAY:
        raise ValueError("numpy _reconstruct of something other than numpy.ndarray")
    return _NumpyArray()


def _scalar(dtype, data):
    """numpy's multiarray.scalar(dtype, bytes): one value."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise ValueError("a NumPy scalar whose state is not a numeric dtype and its bytes")
    return np.frombuffer(data, dtype.dtype)[0]


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _NumpyDType,
    **{(module, name): function for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, function in (("_reconstruct", _reconstruct), ("scalar", _scalar))},
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only _GLOBALS; records each storage's (dtype, numel) by key in `storages`."""

    def __init__(self, file, path: str, storages: dict):
        super().__init__(file)
        self.path, self.storages = path, storages

    def find_class(self, module, name):
        if (module, name) not in _GLOBALS:
            raise UnsafeCheckpointError(f"refusing to load {self.path}: it would import {module}.{name}; a weights "
                                        "file holds only tensors and containers")
        return _GLOBALS[module, name]

    def persistent_load(self, pid):
        """('storage', torch.<T>Storage, key, location, numel[, None]) -> _StorageRef(key)."""
        valid = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and pid[5:] in ((), (None,))
                 and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int))
        if not valid or pid[4] < 0:
            raise ValueError(f"unexpected persistent id {pid!r:.100} (storage views of torch < 1.0 are not read)")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        dtype = np.dtype(STORAGE_DTYPES.get(storage_type.name, np.uint8))  # UntypedStorage: bytes
        if self.storages.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise ValueError(f"storage {key} is declared with two dtypes or sizes")
        return _StorageRef(key)


def _read_zip(path: str) -> tuple[Any, dict, dict, str]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError("a zip archive without one <dir>/data.pkl: not a torch.save file")
        prefix = pickles[0][:-len("data.pkl")]
        storages: dict = {}
        with archive.open(pickles[0]) as f:
            obj = _Unpickler(f, path, storages).load()
        names = set(archive.namelist())
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else sys.byteorder
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byteorder {byteorder!r}")
        raw = {key: archive.read(prefix + "data/" + key) for key in storages}
    return obj, storages, raw, byteorder


def _read_legacy(path: str) -> tuple[Any, dict, dict, str]:
    storages: dict = {}
    with open(path, "rb") as f:
        def unpickle():
            return _Unpickler(f, path, storages).load()

        try:
            magic = unpickle()
        except Exception:  # junk: an HTML page, a truncated download, another format
            magic = None
        if magic != MAGIC_NUMBER:
            raise ValueError("not a torch.save file: neither a zip archive nor a legacy checkpoint "
                             "(a web page or a partial download?)")
        if unpickle() != LEGACY_PROTOCOL:
            raise ValueError(f"legacy torch.save protocol is not {LEGACY_PROTOCOL}")
        unpickle()  # sys_info: the data below is little-endian on every machine
        obj, raw = unpickle(), {}
        for key in unpickle():
            dtype, numel = storages[key]
            if int.from_bytes(f.read(8), "little") != numel:
                raise ValueError(f"storage {key}: its element count differs from the pickled one ({numel})")
            raw[key] = f.read(numel * dtype.itemsize)
    return obj, storages, raw, "little"


class _Arrays:
    """Turns the unpickled markers into arrays: storages from `raw` bytes, tensors cut from them."""

    def __init__(self, storages: dict, raw: dict, byteorder: str):
        self.storages, self.raw, self.byteorder, self.cache = storages, raw, byteorder, {}

    def storage(self, ref: _StorageRef) -> np.ndarray:
        """The 1-D (numel,) array `ref` names, read-only (a view of the file's bytes)."""
        if ref.key not in self.cache:
            dtype, numel = self.storages[ref.key]
            data = self.raw.get(ref.key, b"")
            if len(data) < numel * dtype.itemsize:
                raise ValueError(f"storage {ref.key} is truncated: {len(data)} bytes for {numel} x {dtype}")
            array = np.frombuffer(data, dtype, count=numel)
            self.cache[ref.key] = array if self.byteorder == sys.byteorder else array.byteswap()
        return self.cache[ref.key]

    def tensor(self, t: _Tensor) -> np.ndarray:
        """The (size) array of `t`: its elements offset + sum(index * stride) of the storage, copied."""
        size, stride = tuple(t.size), tuple(t.stride)
        numbers = (t.offset, *size, *stride)
        if not isinstance(t.storage, _StorageRef) or len(size) != len(stride) or not all(
                isinstance(n, int) and n >= 0 for n in numbers):
            raise ValueError(f"a tensor with storage offset {t.offset!r}, size {size!r}, stride {stride!r}")
        data = self.storage(t.storage)
        last = t.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if 0 not in size and last >= len(data):
            raise ValueError(f"a tensor of size {size}, stride {stride} and offset {t.offset} reads element {last} "
                             f"of a storage of {len(data)}")
        itemsize = data.itemsize
        view = np.lib.stride_tricks.as_strided(data[t.offset:], size, tuple(s * itemsize for s in stride))
        return view.copy()

    def finish(self, obj: Any, done: dict) -> Any:
        """`obj` with every marker replaced by its array; dicts and lists are changed in place."""
        if id(obj) in done:
            return done[id(obj)][1]
        if isinstance(obj, _Tensor):
            out = self.tensor(obj)
        elif isinstance(obj, _StorageRef):
            out = self.storage(obj).copy()
        elif isinstance(obj, _NumpyArray):
            out = obj.array
        elif isinstance(obj, tuple):
            out = tuple(self.finish(item, done) for item in obj)
        elif isinstance(obj, (dict, list)):
            done[id(obj)] = obj, obj
            for key, value in list(obj.items() if isinstance(obj, dict) else enumerate(obj)):
                obj[key] = self.finish(value, done)
            return obj
        else:
            return obj
        done[id(obj)] = obj, out  # obj kept alive: its id stays unique
        return out


def load(path: str) -> Any:
    """The object `torch.save` wrote to `path`, with tensors as NumPy arrays (module docstring).

    Raises UnsafeCheckpointError (a ValueError) for a pickle that names any other global, and a
    one-line ValueError naming `path` for anything else that is not a readable checkpoint.
    """
    try:
        obj, storages, raw, byteorder = (_read_zip if zipfile.is_zipfile(path) else _read_legacy)(path)
        return _Arrays(storages, raw, byteorder).finish(obj, {})
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # a damaged file fails anywhere above: one line naming it
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {error}") from error
