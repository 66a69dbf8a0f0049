"""Read torch checkpoints without executing them, and without importing torch.

`torch.load` unpickles whatever a checkpoint names, which runs code: a MACE
``.model`` is a pickled ``nn.Module`` and e3nn 0.4.4's code-generated modules
even compile stored TorchScript when they are unpickled. This module reads
the same files with a restricted `pickle.Unpickler`:

* every global the pickle names must be on an allowlist (see `_resolve`);
  the few real callables on it only build data (containers, numpy arrays,
  bytes); every other allowed class or function becomes an inert
  `PickledObject` record, so NEWOBJ / REDUCE / BUILD run no foreign code;
* tensors become `TorchArray` numpy arrays that remember where their bytes
  are stored in the zip archive (for export);
* e3nn ``CodeGenMixin`` state (``__codegen__`` = {name: TorchScript archive
  bytes}) is parsed the same way and the compiled submodules are put into
  ``_modules`` as e3nn's ``__setstate__`` does, so their buffers (e.g. the
  CG blocks ``_w3j_1_2_1``) appear in `module_state_dict`.

Supported files: the zip format `torch.save` writes since torch 1.6 (one
top folder holding ``data.pkl``, ``data/<key>`` storages, ``byteorder``...)
and TorchScript archives (``torch.jit.save``; ``constants.pkl`` present).
"""

from __future__ import annotations

import ast
import functools
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparse_eqv.errors import CheckpointError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

__all__ = [
    "PickledObject",
    "TorchArray",
    "TorchDtype",
    "load_checkpoint",
    "module_state_dict",
    "named_modules",
]

TRUST_HINT = (
    "torch checkpoints are pickles that can run code; if you trust this file, pass "
    "--trust-checkpoint (trust=True): unknown globals are then read as inert records, never executed"
)


class _Unsupported(Exception):
    """Raised while unpickling; the loader turns it into a CheckpointError naming the file."""


# ---------------------------------------------------------------------------
# Records


class _Global(type):
    """Type of the record classes: one immutable class per pickled global."""

    def __setattr__(cls, name, value):
        raise _Unsupported(f"the pickle sets attribute {name!r} on global {cls.qualname}")

    def __repr__(cls):
        return f"<pickled global {cls.qualname}>"


class PickledObject(metaclass=_Global):
    """Inert record of an object the pickle built from an allowed global.

    Each pickled global ``module.name`` (class or function) becomes a subclass
    of this one whose class attribute `qualname` is ``"module.name"``; the
    global itself, when referenced as a value (e.g. an activation function),
    is that class. Calling it (REDUCE, NEWOBJ) makes an instance that only
    stores what it was given:

    * ``args`` / ``kwargs``: the constructor (NEWOBJ) or REDUCE arguments;
    * ``state``: what BUILD set, usually the instance ``__dict__`` (for a
      ``torch.fx`` GraphModule, pickled as ``reduce_graph_module(body, ...)``,
      the ``body`` dict, which is the module's ``__dict__``).

    ``obj.name`` looks ``name`` up in the state, then in its ``_modules``,
    ``_parameters`` and ``_buffers`` (as ``nn.Module.__getattr__`` does);
    ``obj[i]``, ``len(obj)`` and ``iter(obj)`` go over the submodules (or,
    if there are none, the parameters) in order, as for ``ModuleList``,
    ``Sequential`` and ``ParameterList``; ``obj["key"]`` picks one by name.
    """

    qualname = "PickledObject"
    # Index of the REDUCE argument that is the state (see `_STATE_FROM_ARG`).
    _state_arg: int | None = None
    # For TorchScript module classes: (parameter names, buffer names), read
    # from the class's serialized code; None for everything else.
    _script_members: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        state = args[cls._state_arg] if cls._state_arg is not None and len(args) > cls._state_arg else None
        self.__dict__.update(args=args, kwargs=kwargs, state=state)
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __getattr__(self, name):
        if name.startswith("__") or name in ("args", "kwargs", "state"):
            raise AttributeError(name)
        dicts = _state_dicts(self.state)
        for d in dicts:
            if name in d:
                return d[name]
        for d in dicts:
            for group in ("_modules", "_parameters", "_buffers"):
                members = d.get(group)
                if isinstance(members, dict) and name in members:
                    return members[name]
        raise AttributeError(f"record of {self.qualname} has no attribute {name!r}")

    def _children(self) -> list:
        members = _members(self)
        if members is None:
            raise TypeError(f"record of {self.qualname} is not a module")
        params, _, modules, _ = members
        return list((modules or params).items())

    def __getitem__(self, key):
        children = self._children()
        if isinstance(key, str):
            return dict(children)[key]
        return children[key][1]

    def __len__(self):
        return len(self._children())

    def __iter__(self):
        return iter(value for _, value in self._children())

    def __bool__(self):
        return True

    def __repr__(self):
        return f"<record {self.qualname}>"


def _state_dicts(state) -> list[dict]:
    """The attribute dicts in a BUILD state: ``dict`` or ``(dict, slots dict)``."""
    if isinstance(state, dict):
        return [state]
    if isinstance(state, tuple) and len(state) == 2:
        return [d for d in state if isinstance(d, dict)]
    return []


def _new_record_class(qualname: str, **attributes) -> type[PickledObject]:
    name = qualname.rpartition(".")[2] or qualname
    return _Global(name, (PickledObject,), {"qualname": qualname, "__module__": __name__, **attributes})


_RECORD_CLASSES: dict[str, type[PickledObject]] = {}


def _record_class(qualname: str) -> type[PickledObject]:
    """The (cached) record class of an ordinary global."""
    if qualname not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualname] = _new_record_class(qualname, _state_arg=_STATE_FROM_ARG.get(qualname))
    return _RECORD_CLASSES[qualname]


# ---------------------------------------------------------------------------
# Tensors


class TorchDtype(str):
    """A torch dtype read from a pickle: its name, e.g. ``"float32"``."""

    __slots__ = ()

    def __repr__(self):
        return f"torch.{str(self)}"

    def __setstate__(self, state):
        raise _Unsupported(f"the pickle modifies dtype torch.{self}")


class _StorageType(str):
    """A ``torch.<X>Storage`` class: the name of the dtype it stores."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Unsupported("the pickle modifies a storage type")


_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}

_NUMPY_DTYPES = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "bool": "?",
    "complex64": "c8",
    "complex128": "c16",
}


def _numpy_dtype(torch_dtype: str) -> np.dtype:
    if torch_dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as error:
            raise _Unsupported("bfloat16 tensors need the ml_dtypes package") from error
        return np.dtype(ml_dtypes.bfloat16)
    if torch_dtype not in _NUMPY_DTYPES:
        raise _Unsupported(f"tensors of dtype torch.{torch_dtype} are not supported")
    return np.dtype(_NUMPY_DTYPES[torch_dtype])


class TorchArray(np.ndarray):
    """A tensor read from a checkpoint: numpy values plus where they are stored.

    Provenance attributes (all None on arrays derived from one by slicing,
    copying or arithmetic, which no longer sit where the checkpoint keeps them):

    * ``storage_record``: zip member holding the storage, e.g. ``"model/data/17"``;
    * ``storage_key``: the storage key, e.g. ``"17"``;
    * ``storage_offset``: offset of the first element in the storage, in elements;
      the strides in elements are ``np.array(a.strides) // a.itemsize``;
    * ``torch_dtype``: torch dtype name, e.g. ``"float32"``;
    * ``archive``: None when the storage is a member of the checkpoint's own zip;
      ``"codegen:<name>"`` when it is in the TorchScript archive that an e3nn
      code-generated module keeps, pickled as bytes, in ``__codegen__[name]``.

    Tensors that share a storage share memory, as in torch.
    """

    _PROVENANCE = ("storage_record", "storage_key", "storage_offset", "torch_dtype", "archive")

    def __array_finalize__(self, obj):
        for name in self._PROVENANCE:
            setattr(self, name, None)


class _Storage:
    """A storage as `persistent_load` returns it: typed 1-D values and where they came from."""

    __slots__ = ("values", "record", "key", "torch_dtype", "archive")

    def __init__(self, values: np.ndarray, record: str, key: str, torch_dtype: str, archive: str | None):
        self.values, self.record, self.key, self.torch_dtype, self.archive = values, record, key, torch_dtype, archive

    def __setstate__(self, state):
        raise _Unsupported("the pickle modifies a storage")


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None) -> TorchArray:
    """``storage[storage_offset + sum(i * stride)]`` for every index i < size, without copying."""
    if not isinstance(storage, _Storage):
        raise _Unsupported(f"tensor built from {type(storage).__name__}, not from a storage")
    torch_dtype = storage.torch_dtype if dtype is None else dtype
    values = storage.values
    if dtype is not None:  # _rebuild_tensor_v3: untyped (uint8) storage plus dtype
        if not isinstance(dtype, TorchDtype):
            raise _Unsupported(f"tensor dtype {dtype!r} is not a torch dtype")
        values = values.view(_numpy_dtype(dtype))
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride)) or len(size) != len(stride):
        raise _Unsupported(f"bad tensor geometry: offset {storage_offset}, size {size}, stride {stride}")
    if all(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(values):
        raise _Unsupported(f"tensor of size {size} at offset {storage_offset} runs past storage {storage.key}")
    itemsize = values.itemsize
    array = np.lib.stride_tricks.as_strided(
        values[storage_offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    ).view(TorchArray)
    array.storage_record, array.storage_key, array.storage_offset = storage.record, storage.key, storage_offset
    array.torch_dtype, array.archive = str(torch_dtype), storage.archive
    return array


def _check_metadata(metadata):
    if metadata and any(metadata.values()):
        raise _Unsupported(f"tensors with conjugate/negative bits ({metadata}) are not supported")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """A Parameter is its data; where it sits (``_parameters``) says it is one."""
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor with Python attributes: the tensor; the attributes are dropped."""
    return func(*args)


# ---------------------------------------------------------------------------
# The allowlist


def _encode(text, encoding="utf-8"):
    """``_codecs.encode``, which protocol-2 pickles use for bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _Unsupported(f"_codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def _byte_string(kind: type):
    """``bytes`` / ``bytearray`` from text or bytes (as pickles make them), not ``bytes(n)``."""

    def build(*args):
        if args and not isinstance(args[0], (str, bytes, bytearray)):
            raise _Unsupported(f"{kind.__name__}({args[0]!r})")
        return kind(*args)

    return build


def _numpy_reconstruct(subtype, shape, dtype):
    """``numpy.core.multiarray._reconstruct``: an empty array that BUILD then fills.

    numpy always pickles ``shape=(0,)``; the real shape comes with BUILD, so it is ignored here.
    """
    if subtype is _record_class("numpy.ndarray"):
        return np.ndarray((0,), dtype)
    if isinstance(subtype, _Global):  # an ndarray subclass admitted with trust: a record
        return subtype(shape, dtype)
    raise _Unsupported(f"numpy array of type {subtype!r}")


def _new_object(cls, *args, **kwargs):
    """``copyreg.__newobj__`` / ``_reconstructor``: for records and plain containers only."""
    if isinstance(cls, _Global) or cls in (OrderedDict, set, frozenset, complex):
        return cls.__new__(cls, *args, **kwargs)
    raise _Unsupported(f"copyreg object of type {cls!r}")


# Activation functions modules may keep as attributes (e3nn Gate, nequip, sevenn).
_ACTIVATIONS = frozenset(
    "silu relu gelu elu selu celu leaky_relu softplus sigmoid tanh softsign mish hardswish "
    "hardsigmoid hardtanh logsigmoid relu6 abs square exp".split()
)


def _getattr(obj, name, *, trust: bool):
    """``builtins.getattr``, which torch pickles use for builtins such as ``torch.tanh``.

    Only ``torch._C._VariableFunctionsClass.<activation>`` is allowed; it gives
    the record ``torch.<activation>``. With ``trust``, an attribute of any
    inert global is an inert global too.
    """
    if obj is _record_class("torch._C._VariableFunctionsClass") and name in _ACTIVATIONS:
        return _record_class(f"torch.{name}")
    if trust and isinstance(obj, _Global) and isinstance(name, str):
        return _record_class(f"{obj.qualname}.{name}")
    raise _Unsupported(f"getattr({obj!r}, {name!r})")


# Globals that are real callables: they only build data.
_CALLABLES: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "builtins.bytes": _byte_string(bytes),
    "builtins.bytearray": _byte_string(bytearray),
    "_codecs.encode": _encode,
    "copyreg._reconstructor": lambda cls, base, state: _new_object(cls, *(() if state is None else (state,))),
    "copyreg.__newobj__": _new_object,
    "copyreg.__newobj_ex__": lambda cls, args, kwargs: _new_object(cls, *args, **kwargs),
    "torch.Size": tuple,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.jit._pickle.build_intlist": list,
    "torch.jit._pickle.build_doublelist": list,
    "torch.jit._pickle.build_boollist": list,
    "torch.jit._pickle.build_tensorlist": list,
    "torch.jit._pickle.restore_type_tag": lambda value, type_str: value,
    "numpy.dtype": np.dtype,
    **{f"numpy.{core}.multiarray.{name}": value
       for core in ("core", "_core")
       for name, value in (("_reconstruct", _numpy_reconstruct), ("scalar", _multiarray.scalar))},
}

# Globals that become inert records: exact names and package prefixes.
_RECORD_NAMES = frozenset(
    {
        "torch.device",
        "torch.Tensor",
        "torch._tensor.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
        "torch.fx.graph_module.reduce_graph_module",
        "torch.fx._symbolic_trace.Tracer",
        "torch._C._VariableFunctionsClass",
        "numpy.ndarray",
    }
    | {f"{namespace}.{name}" for namespace in ("torch.nn.functional", "torch._C._nn") for name in _ACTIVATIONS}
)
_RECORD_PACKAGES = ("torch.nn.modules", "e3nn", "mace", "sevenn", "nequip")

# Records whose state is one of their REDUCE arguments rather than a BUILD.
_STATE_FROM_ARG = {"torch.fx.graph_module.reduce_graph_module": 0}

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _resolve(module: str, name: str, trust: bool) -> Any:
    """What a pickled global stands for (python 3 module names); None when it is not allowed.

    Allowed: the data-building callables in `_CALLABLES` (and a restricted
    ``builtins.getattr``); ``torch.<X>Storage``, ``torch.storage.UntypedStorage``
    and ``torch.<dtype>``; records for the names in `_RECORD_NAMES` and for
    everything under the packages in `_RECORD_PACKAGES` (torch.nn.modules,
    e3nn, mace, sevenn, nequip). With ``trust``, any other global is a record.
    """
    qualname = f"{module}.{name}"
    if qualname == "builtins.getattr":
        return functools.partial(_getattr, trust=trust)
    if qualname in _CALLABLES:
        return _CALLABLES[qualname]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and (name in _NUMPY_DTYPES or name == "bfloat16"):
        return TorchDtype(name)
    if (
        trust
        or qualname in _RECORD_NAMES
        or any(module == p or module.startswith(p + ".") for p in _RECORD_PACKAGES)
    ):
        return _record_class(qualname)
    return None


# ---------------------------------------------------------------------------
# Archives


class _Unpickler(pickle.Unpickler):
    """Unpickles one ``.pkl`` member of an archive through the allowlist."""

    def __init__(self, archive: _Archive, pickle_name: str, *, trust: bool, torchscript: bool):
        super().__init__(io.BytesIO(archive.read(pickle_name)))
        self.archive, self.trust, self.torchscript = archive, trust, torchscript
        self.storage_dir = pickle_name.removesuffix(".pkl")

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Unsupported(f"global {module!r}.{name!r}")
        if self.torchscript and (module == "__torch__" or module.startswith("__torch__.")):
            return self.archive.script_class(module, name)
        module = _PY2_MODULES.get(module, module)
        found = _resolve(module, name, self.trust)
        if found is None:
            raise CheckpointError(
                f"{self.archive.label}: refusing to load global '{module}.{name}', which is not on the "
                f"allowlist of weights_convert.torch_pickle; {TRUST_HINT}"
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise _Unsupported(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Unsupported(f"storage of type {storage_type!r}")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        return self.archive.storage(self.storage_dir, str(key), storage_type, numel)


class _Archive:
    """One torch zip archive: the checkpoint itself or a TorchScript archive nested in it."""

    def __init__(self, zip_file: zipfile.ZipFile, label: str, tag: str | None):
        self.zip, self.label, self.tag = zip_file, label, tag
        names = zip_file.namelist()
        self.prefix = names[0].partition("/")[0] if names else ""
        if f"{self.prefix}/data.pkl" not in names:
            raise CheckpointError(f"{label}: is a zip archive but not a torch checkpoint (no data.pkl)")
        self.names = set(names)
        byteorder = self.read("byteorder").decode() if self.has("byteorder") else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{label}: unknown byte order {byteorder!r}")
        self.byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[tuple[str, str], _Storage] = {}
        self._script_classes: dict[str, type[PickledObject]] = {}

    def has(self, name: str) -> bool:
        return f"{self.prefix}/{name}" in self.names

    def read(self, name: str) -> bytes:
        record = f"{self.prefix}/{name}"
        if record not in self.names:
            raise CheckpointError(f"{self.label}: archive member {record} is missing")
        try:
            return self.zip.read(record)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise CheckpointError(f"{self.label}: corrupt archive member {record} ({error})") from error

    def storage(self, storage_dir: str, key: str, torch_dtype: str, numel) -> _Storage:
        """The storage ``<storage_dir>/<key>``, read once and shared by every tensor on it."""
        if (storage_dir, key) in self._storages:
            return self._storages[(storage_dir, key)]
        name = f"{storage_dir}/{key}"
        if not self.has(name):
            raise CheckpointError(f"{self.label}: missing storage {self.prefix}/{name}")
        dtype = _numpy_dtype(torch_dtype)
        raw = self.read(name)
        if not isinstance(numel, int) or len(raw) != numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.label}: corrupt storage {self.prefix}/{name}: {len(raw)} bytes for {numel} x {torch_dtype}"
            )
        values = np.frombuffer(bytearray(raw), dtype=dtype)
        if self.byteorder == ">" and dtype.itemsize > 1:
            if dtype.kind not in "fiuc":
                raise _Unsupported(f"big-endian {torch_dtype} storages are not supported")
            values = values.view(dtype.newbyteorder(">")).astype(dtype)
        storage = _Storage(values, f"{self.prefix}/{name}", key, torch_dtype, self.tag)
        self._storages[(storage_dir, key)] = storage
        return storage

    def script_class(self, module: str, name: str) -> type[PickledObject]:
        """Record class of a TorchScript class; module classes know their parameters and buffers.

        Mangled names (``___torch_mangle_11``) are local to an archive, so these
        classes are too. Their code (``code/__torch__/...py``) is parsed, never run.
        """
        qualname = f"{module}.{name}"
        if qualname not in self._script_classes:
            members = None
            code = f"code/{module.replace('.', '/')}.py"
            if self.has(code):
                members = _script_module_members(self.read(code), name)
            self._script_classes[qualname] = _new_record_class(qualname, _script_members=members)
        return self._script_classes[qualname]

    def unpickle(self, pickle_name: str, *, trust: bool, torchscript: bool = False):
        try:
            return _Unpickler(self, pickle_name, trust=trust, torchscript=torchscript).load()
        except CheckpointError:
            raise
        except _Unsupported as error:
            raise CheckpointError(f"{self.label}: {error}") from None
        except Exception as error:  # pickle reports corrupt data with many exception types
            raise CheckpointError(
                f"{self.label}: corrupt pickle {self.prefix}/{pickle_name} ({type(error).__name__}: {error})"
            ) from error

    def load(self, *, trust: bool):
        """The archive's object: a TorchScript module record, or whatever ``data.pkl`` holds."""
        if self.has("constants.pkl"):
            root = self.unpickle("data.pkl", trust=trust, torchscript=True)
            if isinstance(root, PickledObject):
                root.__dict__["torchscript_constants"] = self.unpickle("constants.pkl", trust=trust, torchscript=True)
            return root
        root = self.unpickle("data.pkl", trust=trust)
        self._load_codegen(root, trust)
        return root

    def _load_codegen(self, root, trust: bool) -> None:
        """Parse e3nn 0.4.4 ``CodeGenMixin`` archives into ``_modules``, as its ``__setstate__`` does."""
        for record in list(_records(root)):
            state = record.state
            if not (isinstance(state, dict) and isinstance(state.get("__codegen__"), dict)):
                continue
            compiled = OrderedDict()
            for fname, blob in state["__codegen__"].items():
                if not isinstance(blob, bytes):
                    raise CheckpointError(f"{self.label}: e3nn codegen entry {fname!r} is not bytes")
                label = f"{self.label} (e3nn codegen archive {fname!r} of {record.qualname})"
                compiled[fname] = _open_archive(io.BytesIO(blob), label, f"codegen:{fname}").load(trust=trust)
            state["_modules"] = OrderedDict([*(state.get("_modules") or {}).items(), *compiled.items()])


def _script_module_members(source: bytes, class_name: str):
    """(``__parameters__``, ``__buffers__``) of TorchScript class ``class_name``; None if not a Module."""
    try:
        tree = ast.parse(source.decode("utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError) as error:
        raise _Unsupported(f"unreadable TorchScript code for {class_name} ({error})") from error
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            if not any(isinstance(base, ast.Name) and base.id == "Module" for base in node.bases):
                return None
            found = {"__parameters__": (), "__buffers__": ()}
            for statement in node.body:
                if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                    target = statement.targets[0]
                    if isinstance(target, ast.Name) and target.id in found:
                        try:
                            found[target.id] = tuple(ast.literal_eval(statement.value))
                        except ValueError as error:
                            raise _Unsupported(f"unreadable {target.id} of TorchScript class {class_name}") from error
            return found["__parameters__"], found["__buffers__"]
    return None


def _records(root) -> Iterator[PickledObject]:
    """Every record reachable from ``root`` through containers, args and state, once each."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, np.ndarray)):
            continue
        seen.add(id(obj))
        if isinstance(obj, PickledObject):
            yield obj
            stack.extend((obj.args, obj.kwargs, obj.state))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)


_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch's pre-1.6 magic number, pickled


def _open_archive(source, label: str, tag: str | None) -> _Archive:
    """Open ``source`` (path or file object) as a torch zip archive, or say why it is not one."""
    try:
        zip_file = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        if isinstance(source, io.BytesIO):
            head = source.getvalue()[:512]
        else:
            with open(source, "rb") as handle:
                head = handle.read(512)
        if head.startswith(b"PK"):
            raise CheckpointError(f"{label}: is a truncated or corrupt zip archive ({error})") from None
        if (head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]) or head[257:262] == b"ustar":
            raise CheckpointError(
                f"{label}: is a torch checkpoint in the legacy (pre-1.6) format; re-save it with a current "
                "torch (torch.save(torch.load(path), path)) where you trust it, then convert again"
            ) from None
        raise CheckpointError(f"{label}: is not a torch checkpoint (not a zip archive)") from None
    except OSError as error:
        raise CheckpointError(f"{label}: cannot read ({error})") from error
    return _Archive(zip_file, label, tag)


def load_checkpoint(path: str | Path, *, trust: bool = False):
    """Read a torch checkpoint without executing anything it contains.

    Args:
        path: a file written by ``torch.save`` (zip format, torch >= 1.6) or
            ``torch.jit.save``.
        trust: admit globals outside the allowlist. They are still not
            imported or run: they become inert `PickledObject` records like
            the allowed ones. Without it such a global is refused with a
            CheckpointError that names it.

    Returns:
        The unpickled object: dicts, lists and numbers as themselves, tensors
        as `TorchArray`, numpy arrays as numpy arrays, torch dtypes as
        `TorchDtype`, and instances of classes (modules, irreps, ...) as
        `PickledObject` records. A TorchScript archive gives the record of
        its root module, with ``torchscript_constants`` (the tuple in
        ``constants.pkl``) in its ``__dict__``.

    Raises:
        CheckpointError: naming the file, when it is not a torch checkpoint,
        uses the legacy format, is truncated or corrupt, lacks a storage, or
        names a global outside the allowlist (without ``trust``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    archive = _open_archive(path, str(path), None)
    with archive.zip:
        return archive.load(trust=trust)


# ---------------------------------------------------------------------------
# Modules


def _members(record):
    """(parameters, buffers, submodules, non-persistent buffer names) of a module record, else None."""
    if not isinstance(record, PickledObject):
        return None
    script = type(record)._script_members
    state = record.state
    if script is not None and isinstance(state, dict):
        params, buffers = script
        modules = {k: v for k, v in state.items() if _members(v) is not None}
        return {n: state.get(n) for n in params}, {n: state.get(n) for n in buffers}, modules, set()
    if isinstance(state, dict) and "_modules" in state and "_parameters" in state:
        return (
            state["_parameters"] or {},
            state.get("_buffers") or {},
            state["_modules"] or {},
            set(state.get("_non_persistent_buffers_set") or ()),
        )
    return None


def named_modules(module: PickledObject, prefix: str = "") -> Iterator[tuple[str, PickledObject]]:
    """``(qualified name, module record)`` for ``module`` and every submodule, each once, like torch."""
    seen = set()

    def visit(record, name):
        if id(record) in seen:
            return
        seen.add(id(record))
        yield name, record
        for child_name, child in _members(record)[2].items():
            if child is not None:
                yield from visit(child, f"{name}.{child_name}" if name else child_name)

    if _members(module) is None:
        raise TypeError(f"{module!r} is not a module record")
    yield from visit(module, prefix)


def module_state_dict(module: PickledObject) -> dict[str, TorchArray]:
    """The keys and values torch's ``module.state_dict()`` gives, in its order.

    Parameters, then persistent buffers (``_non_persistent_buffers_set`` is
    respected), then each submodule's entries under ``<name>.``, recursively.
    TorchScript modules (e3nn codegen) use the ``__parameters__`` and
    ``__buffers__`` their serialized class declares. Python hooks and
    ``get_extra_state`` are code, so they are not reproduced.
    """
    out: dict[str, TorchArray] = {}

    def visit(record, prefix, path):
        members = _members(record)
        if members is None:
            raise TypeError(f"{record!r} at '{prefix}' is not a module record")
        if id(record) in path:
            raise CheckpointError(f"module at '{prefix}' contains itself")
        params, buffers, modules, non_persistent = members
        out.update((prefix + n, v) for n, v in params.items() if v is not None)
        out.update((prefix + n, v) for n, v in buffers.items() if v is not None and n not in non_persistent)
        for name, child in modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.", path | {id(record)})

    visit(module, "", frozenset())
    return out
