"""Reading PyTorch checkpoint files without torch: `read_torch_file(path) -> {dotted_name: np.ndarray}`.

Two kinds of file are read, both zip archives with one top-level folder (`archive/`, or e.g. `RN50/` in
OpenAI's CLIP files) holding `data.pkl` (a pickle) and `data/<key>` (the raw bytes of each storage):
  * `torch.save` files (zip format, torch >= 1.6): a state dict, possibly nested ({"state_dict": {...}});
  * TorchScript archives (`torch.jit.save`, e.g. OpenAI's `RN50.pt`): the pickle is the module tree; which
    attributes are parameters and buffers is read (as text, never run) from the `__parameters__` and
    `__buffers__` lines of the archive's `code/` files, so the names are those of
    `torch.jit.load(path).state_dict()`.

Safety rule: the pickle is never given a real global. `find_class` answers only from an allow-list
(tensor/parameter rebuild functions, storage types and dtypes, `collections.OrderedDict`, TorchScript's list
builders), each mapped to this module's own inert code; TorchScript classes (`__torch__.*`) become placeholder
objects that only record their state. Any other global (`os.system`, `builtins.eval`, `torch.load`, a pickled
`nn.Module` class, ...) raises `UnsafeCheckpointError` when the unpickler meets it, before anything runs.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np

__all__ = ["UnsafeCheckpointError", "read_torch_file"]

# The legacy (torch < 1.6) format starts with a pickled magic number (protocol 2, LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_BF16 = "bfloat16"  # no numpy dtype: read as uint16, widened to float32 after the copy

# Legacy typed storages (what torch 2.x still writes for the classic dtypes) and torch dtypes (the third
# argument of `_rebuild_tensor_v3`, written with `torch.storage.UntypedStorage` for the newer dtypes).
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": _BF16,
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}
_TORCH_DTYPES = {
    "float64": "f8", "double": "f8",
    "float32": "f4", "float": "f4",
    "float16": "f2", "half": "f2",
    "bfloat16": _BF16,
    "int64": "i8", "long": "i8",
    "int32": "i4", "int": "i4",
    "int16": "i2", "short": "i2",
    "int8": "i1",
    "uint8": "u1", "uint16": "u2", "uint32": "u4", "uint64": "u8",
    "bool": "?",
    "complex64": "c8", "complex128": "c16",
}  # fmt: skip


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names a global that is not on the allow-list (nothing was run)."""


class _StorageType:
    """Stand-in for a torch storage class (`torch.FloatStorage`, `torch.storage.UntypedStorage`)."""

    def __init__(self, name: str, dtype: str | None):
        self.name, self.dtype = name, dtype  # dtype None: untyped (bytes; the tensor gives the dtype)


class _DType:
    """Stand-in for a `torch.<dtype>` global."""

    def __init__(self, name: str, dtype: str | None):
        self.name, self.dtype = name, dtype


class _Storage:
    """One `data/<key>` record of the archive, as raw little-endian (or `byteorder`) bytes."""

    def __init__(self, raw: bytes, stype: _StorageType, byteorder: str):
        self.raw, self.stype, self.byteorder = raw, stype, byteorder


class _TorchScriptObject:
    """Inert placeholder for a TorchScript class (`__torch__.*`): records its pickled state, nothing else."""

    qualname = ""

    def __new__(cls, *args: Any):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _numpy_dtype(name: str, byteorder: str) -> np.dtype:
    code = "u2" if name == _BF16 else name
    return np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype_name: str | None = None) -> np.ndarray:
    """A copy of the strided view (offset, size, stride in elements) of a storage, as torch would see it."""
    if not isinstance(storage, _Storage):
        kind = type(storage).__name__
        raise ValueError(f"malformed checkpoint: a tensor's storage is a {kind}, not a storage record")  # noqa: TRY004
    name = dtype_name or storage.stype.dtype
    if name is None:
        raise ValueError("malformed checkpoint: an untyped storage is used without a dtype")
    size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise ValueError(f"malformed checkpoint: tensor of size {size}, stride {stride}, offset {offset}")
    dtype = _numpy_dtype(name, storage.byteorder)
    flat = np.frombuffer(storage.raw, dtype=dtype, count=len(storage.raw) // dtype.itemsize)
    if 0 in size:
        out = np.empty(size, dtype=dtype)
    else:
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if extent > flat.size:
            raise ValueError(
                f"malformed checkpoint: tensor of size {size}, stride {stride}, offset {offset} runs past "
                f"its storage of {flat.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(s * dtype.itemsize for s in stride), writeable=False
        )
        out = np.array(view, order="C")  # a C-contiguous, writable copy, detached from the archive
    out = out.astype(out.dtype.newbyteorder("="), copy=False)
    if name == _BF16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2`: the dtype is the storage's."""
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, dtype=None, metadata=None
):
    """`torch._utils._rebuild_tensor_v3`: an untyped (byte) storage and an explicit dtype."""
    if not isinstance(dtype, _DType):
        raise ValueError(f"malformed checkpoint: _rebuild_tensor_v3 dtype is {type(dtype).__name__}")  # noqa: TRY004
    if dtype.dtype is None:
        raise ValueError(f"tensors of dtype torch.{dtype.name} are not supported (no numpy equivalent)")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """`torch._utils._rebuild_parameter[_with_state]`: the parameter's data."""
    return data


def _as_list(items, *_):
    """`torch.jit._pickle.build_{int,double,bool,tensor}list`: the list itself."""
    return list(items)


def _restore_type_tag(value, type_str=None):
    """`torch.jit._pickle.restore_type_tag`: the value itself (the tag is a type annotation)."""
    return value


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}
_UNSUPPORTED_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "complex32", "chalf")


def _allow_list() -> dict[tuple[str, str], Any]:
    """{(module, name): stand-in} for one load. Fresh objects each time (functions wrapped in a new
    `functools.partial`), so a pickle that BUILDs onto a global cannot alter later loads."""
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    allowed.update({key: functools.partial(fn) for key, fn in _FUNCTIONS.items()})
    for module in ("torch", "torch.storage"):
        allowed[(module, "UntypedStorage")] = _StorageType("UntypedStorage", None)
    allowed.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
    allowed.update({("torch", n): _DType(n, d) for n, d in _TORCH_DTYPES.items()})
    allowed.update({("torch", n): _DType(n, None) for n in _UNSUPPORTED_DTYPES})
    return allowed


class _Unpickler(pickle.Unpickler):
    """`data.pkl` reader: globals from the allow-list only; storages are read from the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
        self._storages: dict[str, _Storage] = {}
        self._script_classes: dict[str, type] = {}
        self._allowed = _allow_list()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._script_classes:
                self._script_classes[qualname] = type(
                    "TorchScriptObject", (_TorchScriptObject,), {"qualname": qualname, "__slots__": ()}
                )
            return self._script_classes[qualname]
        raise UnsafeCheckpointError(
            f"{self._path}: the checkpoint's pickle names the global '{module}.{name}', which is not on the "
            "allow-list of a tensor file; refusing to load it (nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"{self._path}: unsupported persistent record {pid!r:.200}")
        _, stype, key, _location, _numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise ValueError(f"{self._path}: malformed storage record {pid!r:.200}")  # noqa: TRY004
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise ValueError(f"{self._path}: storage '{key}' is missing from the archive") from None
            self._storages[key] = _Storage(raw, stype, self._byteorder)
        return self._storages[key]


def _module_classes(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[bool, list[str], list[str]]]:
    """{qualified class name: (is a Module, parameter names, buffer names)} from the archive's code/ text."""
    classes = {}
    root = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(root) and name.endswith(".py")):
            continue
        module = name[len(root) : -len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8", errors="replace")
        blocks = re.split(r"^(?=class )", text, flags=re.MULTILINE)
        for block in blocks:
            head = re.match(r"class (\w+)\((\w*)\):", block)
            if head is None:
                continue
            lists = {}
            for field in ("__parameters__", "__buffers__"):
                found = re.search(rf"^\s+{field} = \[(.*?)\]", block, flags=re.MULTILINE | re.DOTALL)
                lists[field] = re.findall(r'"((?:[^"\\]|\\.)*)"', found.group(1)) if found else []
            classes[f"{module}.{head.group(1)}"] = (
                head.group(2) == "Module",
                lists["__parameters__"],
                lists["__buffers__"],
            )
    return classes


def _script_state_dict(root: _TorchScriptObject, classes: dict) -> dict[str, np.ndarray]:
    """Parameters, then buffers, then submodules, recursively (the order of `ScriptModule.state_dict()`)."""
    out: dict[str, np.ndarray] = {}

    def visit(obj: _TorchScriptObject, prefix: str, stack: tuple[int, ...]) -> None:
        if id(obj) in stack:
            return
        state = obj.state if isinstance(obj.state, dict) else {}
        info = classes.get(obj.qualname)
        if info is None:  # no code for this class: every tensor attribute counts
            names = [k for k, v in state.items() if isinstance(v, np.ndarray)]
        else:
            names = [k for k in (*info[1], *info[2]) if isinstance(state.get(k), np.ndarray)]
        for k in names:
            out[prefix + k] = state[k]
        for k, v in state.items():
            if isinstance(v, _TorchScriptObject) and classes.get(v.qualname, (True,))[0]:
                visit(v, f"{prefix}{k}.", (*stack, id(obj)))

    visit(root, "", ())
    return out


def _flatten(tree: dict, prefix: str, out: dict[str, np.ndarray]) -> None:
    for k, v in tree.items():
        if isinstance(v, np.ndarray):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, dict):
            _flatten(v, f"{prefix}{k}.", out)


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat {dotted name: numpy array, in the checkpoint's dtype (bfloat16 -> float32)} from a zip-format
    `torch.save` state dict (nested dicts flattened with '.') or a TorchScript archive (the names of
    `torch.jit.load(path).state_dict()`). Never runs code from the file: see `UnsafeCheckpointError`."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        advice = (
            "re-save it with a recent torch (torch.save(torch.load(p, weights_only=True), p)) or convert it to "
            "safetensors"
        )
        if head == _LEGACY_MAGIC:
            raise ValueError(
                f"{path}: legacy (non-zip) torch.save format (torch < 1.6 or _use_new_zipfile_serialization="
                f"False), which this reader does not support; {advice}"
            )
        raise ValueError(f"{path}: not a zip-format PyTorch checkpoint (torch.save >= 1.6 or torch.jit.save); {advice}")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one '<folder>/data.pkl' in the zip, found {len(pickles)}")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip() or "little"
        except KeyError:
            byteorder = "little"  # written since torch 2.1; earlier files are little-endian
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        obj = _Unpickler(archive.read(pickles[0]), archive, prefix, byteorder, path).load()
        if isinstance(obj, _TorchScriptObject):
            return _script_state_dict(obj, _module_classes(archive, prefix))
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise ValueError(f"{path}: the checkpoint holds a {kind}, not a state dict or a module")  # noqa: TRY004
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out
