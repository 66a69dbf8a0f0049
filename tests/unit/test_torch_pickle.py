"""The restricted torch-checkpoint reader against real torch files.

torch (main environment) writes the files and says what they hold; the
MACE model comes from mace-torch in ``.venv-mace`` (see
``tests/torch_ref/pickle_mace_model.py``).
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparse_eqv.errors import CheckpointError  # noqa: E402
from weights_convert.torch_pickle import (  # noqa: E402
    PickledObject,
    TorchArray,
    load_checkpoint,
    module_state_dict,
    named_modules,
)


def assert_same_tensor(ours, ref: torch.Tensor):
    """Same dtype, shape, strides, storage offset and values (bit for bit)."""
    assert isinstance(ours, TorchArray)
    ref = ref.detach()
    assert ours.torch_dtype == str(ref.dtype).removeprefix("torch.")
    assert ours.shape == tuple(ref.shape)
    assert ours.storage_offset == ref.storage_offset()
    if ref.numel() > 1:
        assert tuple(s // ours.itemsize for s in ours.strides) == ref.stride()
    expected = ref.view(torch.int16).numpy().view(ours.dtype) if ref.dtype == torch.bfloat16 else ref.numpy()
    assert ours.dtype == expected.dtype
    np.testing.assert_array_equal(ours, expected, strict=True)
    if expected.dtype.kind == "f":  # also -0.0 and NaN payloads
        assert ours.tobytes() == np.ascontiguousarray(expected).tobytes()


def assert_same(ours, ref):
    """Recursive comparison of our reading with ``torch.load``'s."""
    if isinstance(ref, torch.Tensor):
        assert_same_tensor(ours, ref)
    elif isinstance(ref, np.ndarray):
        assert type(ours) is np.ndarray and ours.dtype == ref.dtype
        np.testing.assert_array_equal(ours, ref, strict=True)
    elif isinstance(ref, torch.device):
        assert isinstance(ours, PickledObject) and ours.qualname == "torch.device"
        assert torch.device(*ours.args) == ref
    elif callable(ref) and not isinstance(ref, type):  # a function kept as a value
        assert isinstance(ours, type) and issubclass(ours, PickledObject)
        assert ours.qualname.rpartition(".")[2] == ref.__name__
    elif isinstance(ref, torch.dtype):
        assert ours == str(ref).removeprefix("torch.")
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref)
        for key in ref:
            assert_same(ours[key], ref[key])
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert_same(a, b)
    else:
        assert type(ours) is type(ref) and ours == ref


def make_toy() -> torch.nn.Module:
    """Parameters and buffers of several dtypes, views, shared storages, nested containers.

    Built from torch.nn classes only (all on the allowlist).
    """
    torch.manual_seed(0)
    toy = torch.nn.Module()
    toy.blocks = torch.nn.ModuleList(
        [torch.nn.ModuleDict({"lin": torch.nn.Linear(3, 4, dtype=dtype), "act": torch.nn.SiLU()})
         for dtype in (torch.float32, torch.float64)]
    )
    toy.seq = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    toy.plist = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(2, dtype=torch.float64))])
    base = torch.randn(4, 6, dtype=torch.float64)
    toy.register_buffer("base", base)
    toy.register_buffer("strided", base[1:, ::2])  # offset 6, strides (6, 2), shares base
    toy.register_buffer("transposed", base.t())
    toy.weight = torch.nn.Parameter(base[2])  # a parameter on the same storage
    toy.register_buffer("counts", torch.arange(5, dtype=torch.int64) - 2)
    toy.register_buffer("mask", torch.tensor([True, False, True]))
    toy.register_buffer("scalar", torch.tensor(-0.0, dtype=torch.float64))
    toy.register_buffer("empty", torch.zeros(0, 3))
    toy.register_buffer("halves", torch.randn(3).half())
    toy.register_buffer("brains", torch.randn(3).bfloat16())
    toy.register_buffer("small", torch.tensor([1, -2], dtype=torch.int8))
    toy.register_buffer("cache", torch.ones(3), persistent=False)
    toy.register_buffer("nothing", None)
    toy.extra = "not a tensor"
    return toy


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.pt"
    model = make_toy()
    torch.save(model, path)
    return path, model


def test_module_state_dict_matches_torch(toy_file):
    path, model = toy_file
    record = load_checkpoint(path)
    ours, ref = module_state_dict(record), model.state_dict()
    assert list(ours) == list(ref)
    assert "cache" not in ours
    for key in ref:
        assert_same_tensor(ours[key], ref[key])
    assert [name for name, _ in named_modules(record)] == [name for name, _ in model.named_modules()]


def test_shared_storage_shares_memory(toy_file):
    record = load_checkpoint(toy_file[0])
    base, strided, transposed, weight = record.base, record.strided, record.transposed, record.weight
    assert np.shares_memory(base, strided) and np.shares_memory(base, transposed) and np.shares_memory(base, weight)
    assert base.storage_key == strided.storage_key == weight.storage_key
    base[2, 0] = 123.0
    assert weight[0] == 123.0 and transposed[0, 2] == 123.0


def test_provenance_points_at_the_storage_bytes(toy_file):
    path, model = toy_file
    sd = module_state_dict(load_checkpoint(path))
    with zipfile.ZipFile(path) as archive:
        for key in ("strided", "blocks.1.lin.weight", "counts", "seq.2.bias"):
            array = sd[key]
            assert array.archive is None
            flat = np.frombuffer(archive.read(array.storage_record), dtype=array.dtype)
            rebuilt = np.lib.stride_tricks.as_strided(flat[array.storage_offset :], array.shape, array.strides)
            np.testing.assert_array_equal(rebuilt, model.state_dict()[key].numpy())
    assert (sd["counts"] + 1).storage_key is None  # derived arrays claim no provenance


def test_record_access(toy_file):
    record = load_checkpoint(toy_file[0])
    assert record.qualname == "torch.nn.modules.module.Module"
    assert record.blocks.qualname == "torch.nn.modules.container.ModuleList"
    assert len(record.blocks) == 2 and [b.lin.qualname for b in record.blocks] == ["torch.nn.modules.linear.Linear"] * 2
    assert record.blocks[1].lin.weight.dtype == np.float64 and record.blocks[-1] is record.blocks[1]
    assert record.blocks[0]["act"].qualname == "torch.nn.modules.activation.SiLU"
    assert record.seq[1].qualname == "torch.nn.modules.activation.Tanh" and record.seq["2"] is record.seq[2]
    assert record.plist[0].shape == (2,)
    assert record.extra == "not a tensor" and record.state["training"] is True
    assert record.blocks.args == () and record.blocks.state["_modules"]["0"] is record.blocks[0]
    with pytest.raises(AttributeError):
        record.no_such_attribute


class Custom(torch.nn.Module):
    """A module class that no allowlist knows."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


def test_unknown_module_class_needs_trust(tmp_path):
    path = tmp_path / "custom.pt"
    model = Custom()
    torch.save(model, path)
    with pytest.raises(CheckpointError, match=rf"'{Custom.__module__}\.Custom'.*--trust-checkpoint"):
        load_checkpoint(path)
    record = load_checkpoint(path, trust=True)
    assert record.qualname == f"{Custom.__module__}.Custom"
    ours = module_state_dict(record)
    assert list(ours) == ["lin.weight", "lin.bias"]
    assert_same_tensor(ours["lin.weight"], model.lin.weight)


def test_dict_checkpoint_matches_torch_load(tmp_path):
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(3, 2))
    weight.note = "python state on a parameter"
    tagged = torch.randn(2)
    tagged.tag = 7  # python state on a plain tensor
    payload = {
        "state": OrderedDict(w=weight.detach(), v=torch.randn(5, dtype=torch.float64)[1::2]),
        "param": weight,
        "tagged": tagged,
        "wide": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # torch._utils._rebuild_tensor_v3
        "int32": torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).t(),
        "config": {
            "irreps": ["8x0e", "8x1o"],
            "cutoff": 5.0,
            "pair": (1, "a"),
            "none": None,
            "bytes": b"\x00\xff",
            "dtype": torch.float64,
            "device": torch.device("cpu"),
            "shift": np.array([1.5, -2.0], dtype=np.float32),
            "count": np.int64(3),
            "activations": [torch.tanh, torch.nn.functional.silu, torch.nn.functional.gelu],
        },
        "epoch": 12,
    }
    for protocol in (2, 4):
        path = tmp_path / f"payload{protocol}.pth"
        torch.save(payload, path, pickle_protocol=protocol)
        ours = load_checkpoint(path)
        ref = torch.load(path, weights_only=False)
        assert_same(ours, ref)
        assert ours["config"]["count"] == 3 and ours["config"]["count"].dtype == np.int64
        assert ours["config"]["dtype"] == "float64"
        assert [f.qualname for f in ours["config"]["activations"]] == [
            "torch.tanh", "torch.nn.functional.silu", "torch._C._nn.gelu"
        ]


class ScriptInner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("b", torch.arange(3))

    def forward(self, x):
        return x * self.w + self.b


class ScriptOuter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ScriptInner()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(self.inner(x).float())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save
def test_torchscript_archive(tmp_path):
    scripted = torch.jit.script(ScriptOuter())
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, path)
    record = load_checkpoint(path)
    ours, ref = module_state_dict(record), scripted.state_dict()
    assert set(ours) == set(ref)
    for key in ref:
        assert_same_tensor(ours[key], ref[key])
    assert record.torchscript_constants == ()


# ---------------------------------------------------------------------------
# MACE


@pytest.fixture(scope="module")
def mace_files(tmp_path_factory, mace_python, repo_root):
    """A small random MACE `.model` saved by mace-torch, and its reference npz."""
    out = tmp_path_factory.mktemp("mace")
    model, reference = out / "small.model", out / "reference.npz"
    script = repo_root / "tests" / "torch_ref" / "pickle_mace_model.py"
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [str(mace_python), str(script), str(model), str(reference)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return model, dict(np.load(reference))


def test_mace_model_state_dict(mace_files):
    path, reference = mace_files
    record = load_checkpoint(path)
    assert record.qualname == "mace.modules.models.ScaleShiftMACE"
    ours = module_state_dict(record)
    assert list(ours) == list(reference["keys_after_load"])
    expected = {k: v for k, v in reference.items() if not k.startswith("w3j/") and k != "keys_after_load"}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value, strict=True, err_msg=key)


def test_mace_codegen_cg_blocks(mace_files):
    path, reference = mace_files
    record = load_checkpoint(path)
    w3j = {k.removeprefix("w3j/"): v for k, v in reference.items() if k.startswith("w3j/")}
    assert w3j
    for name, value in w3j.items():
        module_path, _, buffer = name.rpartition(".")
        module = dict(named_modules(record))[module_path]
        array = getattr(module, buffer)
        assert array.archive == "codegen:" + module_path.rpartition(".")[2]
        np.testing.assert_array_equal(array, value, strict=True)
    tp = record.interactions[1].conv_tp
    assert tp._compiled_main_left_right._w3j_1_2_1.shape == (3, 5, 3)
    assert set(tp.state["__codegen__"]) == {"_compiled_main_left_right", "_compiled_main_right"}


# ---------------------------------------------------------------------------
# Untrusted and broken files


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A torch-style zip archive around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", data_pkl)
        archive.writestr("evil/byteorder", "little")
        archive.writestr("evil/version", "3\n")
    return path


def reduce_call(module: str, name: str, args: tuple) -> bytes:
    """Protocol-2 pickle of ``module.name(*args)`` (written by hand: nothing is imported)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1] + b"R."


def attack(kind: str, marker: Path) -> tuple[str, bytes]:
    """(the global it names, data.pkl) of a pickle that would create ``marker`` if run."""
    python = f"open({str(marker)!r}, 'w').close()"

    class StackGlobalExec:
        def __reduce__(self):
            return (exec, (python,))

    return {
        "os.system": ("os.system", reduce_call("os", "system", (f"touch {marker}",))),
        "posix.system": ("posix.system", reduce_call("posix", "system", (f"touch {marker}",))),
        "exec": ("builtins.exec", reduce_call("builtins", "exec", (python,))),
        "py2-eval": ("builtins.eval", reduce_call("__builtin__", "eval", (python,))),
        "exec-protocol-4": ("builtins.exec", pickle.dumps(StackGlobalExec(), protocol=4)),  # STACK_GLOBAL
        "Popen": ("subprocess.Popen", reduce_call("subprocess", "Popen", (["touch", str(marker)],))),
    }[kind]


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "exec", "py2-eval", "exec-protocol-4", "Popen"])
def test_code_in_pickle_is_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    name, data = attack(kind, marker)
    path = torch_zip(tmp_path / "evil.pt", data)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert f"'{name}'" in message and str(path) in message and "--trust-checkpoint" in message
    assert not marker.exists()
    record = load_checkpoint(path, trust=True)  # admitted as an inert record, still not run
    assert isinstance(record, PickledObject) and record.qualname == name
    assert not marker.exists()


def test_getattr_reaches_only_activations(tmp_path):
    """``getattr(torch._C._VariableFunctionsClass, name)`` is how torch.tanh pickles; nothing else passes."""
    data = b"\x80\x02c__builtin__\ngetattr\nctorch._C\n_VariableFunctionsClass\nX\x04\x00\x00\x00load\x86R."
    path = torch_zip(tmp_path / "getattr.pt", data)
    with pytest.raises(CheckpointError, match=r"getattr\(<pickled global torch._C._VariableFunctionsClass>, 'load'\)"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True).qualname == "torch._C._VariableFunctionsClass.load"


def test_code_in_codegen_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    script = io.BytesIO()
    with zipfile.ZipFile(script, "w") as archive:
        archive.writestr("archive/data.pkl", reduce_call("os", "system", (f"touch {marker}",)))
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    state = {"_parameters": {}, "_buffers": {}, "_modules": {}, "__codegen__": {"_compiled_main": script.getvalue()}}
    data_pkl = b"\x80\x02ce3nn.o3._linear\nLinear\n)\x81" + pickle.dumps(state, protocol=2)[2:-1] + b"b."
    path = torch_zip(tmp_path / "codegen.model", data_pkl)
    with pytest.raises(CheckpointError, match=r"codegen archive '_compiled_main'.*'os\.system'"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)._compiled_main.qualname == "os.system"
    assert not marker.exists()


def test_bad_files(tmp_path, toy_file):
    cases = {}
    cases["random.pt"] = (np.random.default_rng(0).bytes(4096), "is not a torch checkpoint")
    cases["text.pt"] = (b"energy,forces\n1.0,2.0\n", "is not a torch checkpoint")
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    cases["legacy.pt"] = (legacy.getvalue(), "legacy .*re-save it with a current torch")
    good = toy_file[0].read_bytes()
    cases["truncated.pt"] = (good[: len(good) // 2], "truncated or corrupt")
    cases["empty.pt"] = (b"", "is not a torch checkpoint")
    for name, (data, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=pattern) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")


def rewrite_zip(source: Path, target: Path, change) -> Path:
    """Copy a zip archive member by member; ``change(name, data)`` returns new data or None to drop it."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info, data)
    return target


def test_damaged_archives(tmp_path, toy_file):
    good = toy_file[0]
    missing = rewrite_zip(good, tmp_path / "missing.pt", lambda n, d: None if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointError, match=r"missing storage .*data/0") as error:
        load_checkpoint(missing)
    assert str(missing) in str(error.value)
    short = rewrite_zip(good, tmp_path / "short.pt", lambda n, d: d[:-4] if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointError, match=r"corrupt storage .*data/0"):
        load_checkpoint(short)
    garbled = rewrite_zip(good, tmp_path / "garbled.pt", lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d)
    with pytest.raises(CheckpointError, match="corrupt pickle"):
        load_checkpoint(garbled)
    no_pickle = rewrite_zip(good, tmp_path / "nopkl.pt", lambda n, d: None if n.endswith("data.pkl") else d)
    with pytest.raises(CheckpointError, match="no data.pkl"):
        load_checkpoint(no_pickle)
    flipped = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else -1)
    name_length, extra_length = struct.unpack_from("<HH", flipped, info.header_offset + 26)
    flipped[info.header_offset + 30 + name_length + extra_length] ^= 0xFF  # a storage no longer matches its CRC
    (tmp_path / "flipped.pt").write_bytes(flipped)
    with pytest.raises(CheckpointError, match="corrupt archive member"):
        load_checkpoint(tmp_path / "flipped.pt")


# ---------------------------------------------------------------------------
# SevenNet


def test_sevennet_checkpoint_matches_weights_only_load():
    spec = importlib.util.find_spec("sevenn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sevenn is not installed in this environment")
    path = (
        Path(spec.submodule_search_locations[0])
        / "pretrained_potentials"
        / "SevenNet_0__11Jul2024"
        / "checkpoint_sevennet_0.pth"
    )
    ours = load_checkpoint(path)
    numpy_globals = [(np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    numpy_globals += [type(np.dtype(code)) for code in ("f4", "f8", "i4", "i8", "?", "u1")]
    with torch.serialization.safe_globals(numpy_globals):
        ref = torch.load(path, weights_only=True, map_location="cpu")
    assert_same(ours, ref)
    assert len(ours["model_state_dict"]) == len(ref["model_state_dict"]) > 100
