"""mace-torch `.model` files -> (config, variables) of `sparse_eqv.models.mace.MACE`.

The `.model` pickle is read with `weights_convert.torch_pickle` (no torch,
no mace, no e3nn, nothing executed). The converter

1. reads mace's hyperparameters back from the module tree (mace does not
   store its constructor arguments), refusing options outside what the Flax
   model reproduces with `UnsupportedModelError`;
2. re-derives every e3nn instruction list and path weight the Flax model uses
   and checks it against the pickled `instructions` (exact equality);
3. maps each torch tensor slice to one Flax leaf, and reads the constants
   (E0s, scale/shift, avg_num_neighbors, normalize2mom constants, U matrices,
   the codegen Clebsch-Gordan blocks `_w3j_*`, radial and ZBL buffers);
4. checks the tree against `jax.eval_shape(module.init, ...)`.

`config["torch_names"]` maps every leaf ("params/..." and "constants/...")
to `[state_dict key, start, stop, leaf_shape, torch_shape]`: the leaf is
`state_dict[key].reshape(-1)[start:stop].reshape(leaf_shape)`, and
`torch_shape` is the shape of the whole torch tensor. Python attributes that
are not in the state dict (avg_num_neighbors, normalize2mom `cst`) appear as
`[dotted attribute path, None, None, [], []]`.
"""

from __future__ import annotations

import hashlib
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import e3nn_jax as e3nn
import numpy as np

from sparse_eqv.errors import CheckpointError, UnsupportedModelError
from sparse_eqv.models.blocks import (
    fully_connected_tp_instructions,
    linear_instructions,
    tp_path_weights,
    tp_w3j_keys,
    tp_weight_name,
    w3j_name,
)
from sparse_eqv.models.mace import (
    INTERACTION_CLASSES,
    MACE,
    check_supported,
    conv_tp_structure,
    mace_structure,
    sh_irreps,
    u_couplings,
)
from weights_convert.torch_pickle import PickledObject, load_checkpoint, module_state_dict

MODEL_CLASSES = ("MACE", "ScaleShiftMACE")
GATES = {
    "torch.nn.functional.silu": "silu",
    "torch._C._nn.silu": "silu",
    "torch.silu": "silu",
    "torch.tanh": "tanh",
    "torch.nn.functional.tanh": "tanh",
}


# ---------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------


def _irreps(record) -> e3nn.Irreps:
    """An e3nn (torch) `Irreps` record as e3nn-jax Irreps (same entries, same order)."""
    if isinstance(record, str):
        return e3nn.Irreps(record)
    entries = []
    for mul_ir in record.args[0]:
        mul, ir = mul_ir.args[0]
        l, p = ir.args[0]
        entries.append((int(mul), (int(l), int(p))))
    return e3nn.Irreps(entries)


def _attr(record: PickledObject, name: str, default: Any = None) -> Any:
    """`getattr(module, name, default)` on a record (state, then submodules, parameters, buffers)."""
    try:
        return getattr(record, name)
    except AttributeError:
        return default


def _has_module(record: PickledObject, name: str) -> bool:
    modules = record.state.get("_modules") if isinstance(record.state, dict) else None
    return isinstance(modules, dict) and modules.get(name) is not None


def _class_name(record) -> str:
    return record.qualname.rpartition(".")[2] if isinstance(record, PickledObject) else type(record).__name__


def _pickle_globals(path: Path) -> set[str]:
    """Module names of the globals the checkpoint's data.pkl refers to (decoded, never run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            data = archive.read(names[0]) if names else b""
        return {arg.split(" ")[0] for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except Exception:  # not a zip / corrupt: load_checkpoint reports it properly
        return set()


def _describe(root: Any) -> str:
    """A short description of what a checkpoint holds, for errors."""
    if isinstance(root, dict):
        keys = [str(k) for k in root]
        kind = ""
        if "model_state_dict" in root and "config" in root:
            kind = " (looks like a SevenNet checkpoint)"
        elif "state_dict" in root:
            kind = " (a training checkpoint or bare state dict)"
        elif all(isinstance(v, np.ndarray) for v in root.values()):
            kind = " (a bare state dict)"
        return f"a dict with keys {', '.join(keys[:8])}{'...' if len(keys) > 8 else ''}{kind}"
    if isinstance(root, PickledObject):
        return f"a pickled {root.qualname}"
    return f"a pickled {type(root).__name__}"


def _load_model(path: Path, trust: bool) -> PickledObject:
    globals_ = _pickle_globals(path)
    if any(g.startswith(("cuequivariance", "openequivariance")) for g in globals_):
        raise CheckpointError(
            f"{path}: this MACE model was saved with cuequivariance/openequivariance modules; convert it to "
            "e3nn first (mace: `python -m mace.cli.convert_cueq_e3nn MODEL --output_model MODEL_e3nn`, or "
            "`mace.cli.convert_oeq_e3nn`) and convert that file"
        )
    root = load_checkpoint(path, trust=trust)
    if not (isinstance(root, PickledObject) and root.qualname.startswith("mace.modules.")):
        raise CheckpointError(
            f"{path}: expected a MACE model (a torch.save'd mace.modules.models.MACE or ScaleShiftMACE, "
            f"as in mace's .model files), found {_describe(root)}"
        )
    name = _class_name(root)
    if name not in MODEL_CLASSES:
        raise UnsupportedModelError(
            f"{path}: model class {name} is not supported by the Flax MACE (supported: {', '.join(MODEL_CLASSES)})"
        )
    return root


# ---------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------


def _unsupported(path: Path, option: str, value: Any, cls: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{path}: {cls} option {option}={value!r} is not supported by the Flax MACE")


def _check_cueq(path: Path, module: PickledObject, where: str) -> None:
    for key in ("cueq_config", "oeq_config"):
        config = _attr(module, key)
        if isinstance(config, PickledObject) and isinstance(config.state, dict) and config.state.get("enabled"):
            raise CheckpointError(
                f"{path}: {where} was built with {key}.enabled=True (cuequivariance/openequivariance layout); "
                "convert the model to e3nn first with mace.cli.convert_cueq_e3nn and convert that file"
            )


def _read_config(path: Path, model: PickledObject, sd: dict, head: str | None) -> dict[str, Any]:
    """mace's constructor arguments, recovered from the module tree."""
    cls = _class_name(model)
    for option, bad in (("use_so3", True), ("use_agnostic_product", True)):
        if _attr(model, option, False) == bad:
            raise _unsupported(path, option, bad, cls)
    if _attr(model, "edge_irreps") is not None:
        raise _unsupported(path, "edge_irreps", str(_irreps(model.edge_irreps)), cls)
    if _has_module(model, "joint_embedding") or _has_module(model, "embedding_readout"):
        raise _unsupported(path, "embedding_specs", _attr(model, "embedding_specs"), cls)
    for name, module in (("model", model), *((f"interactions.{i}", m) for i, m in enumerate(model.interactions))):
        _check_cueq(path, module, name)

    radial = model.radial_embedding
    basis = _class_name(radial.bessel_fn)
    if basis != "BesselBasis":
        raise _unsupported(path, "radial_type", basis, "RadialEmbeddingBlock")
    if _has_module(radial, "distance_transform"):
        transform = _class_name(radial.distance_transform)
        if transform != "AgnesiTransform":
            raise _unsupported(path, "distance_transform", transform, "RadialEmbeddingBlock")
        distance_transform = "Agnesi"
    else:
        distance_transform = "None"
    sh = model.spherical_harmonics
    if not (sh.normalize and sh.normalization == "component" and sh._is_range_lmax and str(_irreps(sh.irreps_in)) == "1x1o"):
        raise _unsupported(path, "spherical_harmonics", f"{_irreps(sh.irreps_out)} from {_irreps(sh.irreps_in)}", cls)

    interactions = list(model.interactions)
    products = list(model.products)
    n = int(sd["num_interactions"])
    if len(interactions) != n or len(products) != n:
        raise CheckpointError(f"{path}: num_interactions={n} but {len(interactions)} interaction blocks")
    kinds = [_class_name(m) for m in interactions]
    for option, kind in (("interaction_first", kinds[0]), *(("interaction", k) for k in kinds[1:])):
        if kind not in INTERACTION_CLASSES:
            raise UnsupportedModelError(
                f"{path}: {cls} option {option} (interaction block class)={kind!r} is not supported by the "
                f"Flax MACE (supported: {', '.join(INTERACTION_CLASSES)})"
            )
    if len(set(kinds[1:])) > 1:
        raise _unsupported(path, "interaction_cls", kinds[1:], cls)
    hidden = _irreps(interactions[1].node_feats_irreps) if n > 1 else _irreps(interactions[0].hidden_irreps)
    last_out = _irreps(products[-1].linear.irreps_out)

    readouts = list(model.readouts)
    nonlinear = [r for r in readouts if _class_name(r) != "LinearReadoutBlock"]
    heads = list(_attr(model, "heads", None) or ["Default"])
    mlp_irreps, gate = "16x0e", "silu"
    for readout in nonlinear:
        if _class_name(readout) != "NonLinearReadoutBlock":
            raise _unsupported(path, "readout_cls", _class_name(readout), cls)
        mlp = _irreps(readout.hidden_irreps)
        if len(mlp) != 1 or mlp[0].ir != e3nn.Irrep("0e") or mlp[0].mul % len(heads):
            raise _unsupported(path, "MLP_irreps", str(mlp), "NonLinearReadoutBlock")
        mlp_irreps = f"{mlp[0].mul // len(heads)}x0e"
        act = list(readout.non_linearity.acts)[0]
        if act is None:
            gate = None
        else:
            function = act.f
            qualname = getattr(function, "qualname", repr(function))
            if qualname not in GATES:
                raise _unsupported(path, "gate", qualname, "NonLinearReadoutBlock")
            gate = GATES[qualname]

    if head is None:
        if len(heads) != 1:
            raise CheckpointError(f"{path}: the model has heads {', '.join(heads)}; choose one (head=...)")
        head = heads[0]
    elif head not in heads:
        raise CheckpointError(f"{path}: no head {head!r} in the model (heads: {', '.join(heads)})")

    cutoff_p = int(radial.cutoff_fn.p)
    if _attr(model, "pair_repulsion", False) and int(model.pair_repulsion_fn.p) != cutoff_p:
        raise _unsupported(path, "pair_repulsion_fn.p", int(model.pair_repulsion_fn.p), "ZBLBasis")
    product_couplings = []
    for t, product in enumerate(products):
        irreps_in = _irreps(product.symmetric_contractions.irreps_in)
        l_of_dim = np.asarray([ir.l for _, ir in irreps_in for _ in range(ir.dim)])
        contractions = list(product.symmetric_contractions.contractions)
        product_couplings.append(
            [[u_couplings(np.asarray(sd[f"products.{t}.symmetric_contractions.contractions.{o}.U_matrix_{nu}"]),
                          l_of_dim, nu)
              for nu in range(1, int(c.correlation) + 1)] for o, c in enumerate(contractions)]
        )
    return {
        "model": "mace",
        "mace_class": cls,
        "atomic_numbers": [int(z) for z in sd["atomic_numbers"]],
        "r_max": float(sd["r_max"]),
        "num_bessel": int(sd["radial_embedding.bessel_fn.bessel_weights"].shape[0]),
        "num_polynomial_cutoff": cutoff_p,
        "max_ell": int(sh._lmax),
        "interaction_first": kinds[0],
        "interaction": kinds[1] if n > 1 else kinds[0],
        "num_interactions": n,
        "hidden_irreps": str(hidden),
        "MLP_irreps": mlp_irreps,
        "correlation": [int(p.symmetric_contractions.contractions[0].correlation) for p in products],
        "gate": gate,
        "radial_MLP": [int(h) for h in list(interactions[0].conv_tp_weights.hs)[1:-1]],
        "pair_repulsion": bool(_attr(model, "pair_repulsion", False)),
        "distance_transform": distance_transform,
        "apply_cutoff": bool(_attr(radial, "apply_cutoff", True)),
        "use_last_readout_only": bool(_attr(model, "use_last_readout_only", False)),
        "keep_last_layer_irreps": n > 1 and len(last_out) > 1,
        "heads": heads,
        "head": head,
        "product_couplings": product_couplings,
    }


# ---------------------------------------------------------------------------
# Tensors -> leaves
# ---------------------------------------------------------------------------


class _Mapper:
    """Collects leaves and their torch names, checking structure as it goes."""

    def __init__(self, path: Path, sd: dict):
        self.path, self.sd = path, sd
        self.params: dict[str, np.ndarray] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.names: dict[str, list] = {}

    def fail(self, where: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {where}: {problem}")

    def tensor(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise self.fail(key, "missing from the state dict")
        return np.asarray(self.sd[key])

    def put(self, collection: str, leaf: str, key: str, start: int = 0, stop: int | None = None, shape=None):
        """Leaf = state_dict[key].reshape(-1)[start:stop].reshape(shape)."""
        full = self.tensor(key)
        flat = full.reshape(-1)
        stop = flat.size if stop is None else stop
        shape = tuple(full.shape) if shape is None else tuple(shape)
        if stop > flat.size or int(np.prod(shape)) != stop - start:
            raise self.fail(key, f"cannot take [{start}:{stop}] as {shape} from a tensor of shape {full.shape}")
        value = np.array(flat[start:stop], dtype=np.float64).reshape(shape)
        (self.params if collection == "params" else self.constants)[leaf] = value
        self.names[f"{collection}/{leaf}"] = [key, start, stop, list(shape), list(full.shape)]

    def put_attribute(self, leaf: str, attribute: str, value: float):
        self.constants[leaf] = np.asarray(value, dtype=np.float64)
        self.names[f"constants/{leaf}"] = [attribute, None, None, [], []]

    def check_irreps(self, where: str, found, expected: str):
        if _irreps(found) != e3nn.Irreps(expected):
            raise self.fail(where, f"irreps {_irreps(found)} where the model derives {expected}")

    def linear(self, leaf: str, key: str, record: PickledObject, irreps_in: str, irreps_out: str):
        """An e3nn o3.Linear: one leaf per instruction, checked against the pickled instructions."""
        self.check_irreps(f"{key}.irreps_in", record.irreps_in, irreps_in)
        self.check_irreps(f"{key}.irreps_out", record.irreps_out, irreps_out)
        paths = linear_instructions(e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_out))
        pickled = [ins.args for ins in record.instructions]
        derived = [(p.i_in, p.i_out, p.shape, p.path_weight) for p in paths]
        if [(a, b, tuple(s), w) for a, b, s, w in pickled] != derived:
            raise self.fail(key, f"Linear instructions {pickled} differ from the derived {derived}")
        bias = self.sd.get(f"{key}.bias")
        if bias is not None and bias.size:
            raise self.fail(key, "Linear with biases is not supported")
        for p in paths:
            if 0 not in p.shape:
                self.put("params", f"{leaf}/{p.name}", f"{key}.weight", p.start, p.start + p.shape[0] * p.shape[1], p.shape)

    def fctp(self, leaf: str, key: str, record: PickledObject, in1: str, in2: str, out: str):
        """An e3nn o3.FullyConnectedTensorProduct with internal weights."""
        for name, irreps in (("irreps_in1", in1), ("irreps_in2", in2), ("irreps_out", out)):
            self.check_irreps(f"{key}.{name}", getattr(record, name), irreps)
        i1, i2, io = e3nn.Irreps(in1), e3nn.Irreps(in2), e3nn.Irreps(out)
        instructions = fully_connected_tp_instructions(i1, i2, io)
        self._check_tp(key, record, instructions)
        for ins in instructions:
            size = int(np.prod(ins.shape))
            name = f"{leaf}/{tp_weight_name(ins, i1, i2, io)}"
            self.put("params", name, f"{key}.weight", ins.start, ins.start + size, ins.shape)
        self._w3j(leaf, key, i1, i2, io, instructions)

    def conv_tp(self, leaf: str, key: str, record: PickledObject, in1: str, in2: str, target: str):
        """The interaction's 'uvu' TensorProduct (external weights): only its CG blocks are leaves."""
        i1, i2 = e3nn.Irreps(in1), e3nn.Irreps(in2)
        irreps_mid, raw = conv_tp_structure(i1, i2, e3nn.Irreps(target))
        for name, irreps in (("irreps_in1", in1), ("irreps_in2", in2), ("irreps_out", str(irreps_mid))):
            self.check_irreps(f"{key}.{name}", getattr(record, name), irreps)
        instructions = tp_path_weights(i1, i2, irreps_mid, raw)
        self._check_tp(key, record, instructions)
        if _attr(record, "shared_weights", False) or _attr(record, "internal_weights", False):
            raise self.fail(key, "expected shared_weights=False, internal_weights=False")
        self._w3j(leaf, key, i1, i2, irreps_mid, instructions)
        return sum(int(np.prod(ins.shape)) for ins in instructions)

    def _check_tp(self, key: str, record: PickledObject, instructions) -> None:
        if not _attr(record, "_specialized_code", True):
            raise self.fail(key, "e3nn TensorProduct with _specialized_code=False is not supported")
        pickled = [tuple(ins.args) for ins in record.instructions]
        derived = [(i.i_in1, i.i_in2, i.i_out, i.mode, i.has_weight, i.path_weight, i.shape) for i in instructions]
        if [(a, b, c, d, e, f, tuple(g)) for a, b, c, d, e, f, g in pickled] != derived:
            raise self.fail(key, f"TensorProduct instructions {pickled} differ from the derived {derived}")

    def _w3j(self, leaf, key, i1, i2, io, instructions) -> None:
        """The codegen CG blocks, checked against e3nn-jax's up to a sign per (l1, l2, l3)."""
        for lll in tp_w3j_keys(i1, i2, io, instructions):
            buffer = f"{key}._compiled_main_left_right._w3j_{lll[0]}_{lll[1]}_{lll[2]}"
            block = self.tensor(buffer)
            reference = np.asarray(e3nn.clebsch_gordan(*lll))
            if block.shape != reference.shape or not (
                np.allclose(block, reference, atol=1e-10) or np.allclose(block, -reference, atol=1e-10)
            ):
                raise self.fail(buffer, f"CG block of {lll} differs from e3nn-jax's by more than a sign")
            self.put("constants", f"{leaf}/{w3j_name(lll)}", buffer)

    def fc_net(self, leaf: str, key: str, record: PickledObject, hs: list[int], act_used: bool) -> None:
        """An e3nn FullyConnectedNet: one leaf per layer, plus its normalize2mom constant."""
        if list(record.hs) != list(hs):
            raise self.fail(key, f"FullyConnectedNet widths {list(record.hs)} where the model derives {hs}")
        for k in range(len(hs) - 1):
            layer = getattr(record, f"layer{k}")
            if float(layer.var_in) != 1.0 or float(layer.var_out) != 1.0:
                raise self.fail(f"{key}.layer{k}", "FullyConnectedNet with variance_in/out != 1 is not supported")
            self.put("params", f"{leaf}/layer{k}", f"{key}.layer{k}.weight")
        if act_used:
            act = record.layer0.act
            function = getattr(act.f, "qualname", repr(act.f))
            if GATES.get(function) != "silu":
                raise self.fail(key, f"activation {function}, expected silu")
            self.put_attribute(f"{leaf}/act_norm", f"{key}.layer0.act.cst", 1.0 if act._is_id else float(act.cst))


def _map_variables(path: Path, model: PickledObject, sd: dict, config: dict) -> _Mapper:
    m = _Mapper(path, sd)
    layers, readouts = mace_structure(config)
    n_elements = len(config["atomic_numbers"])
    heads, head = config["heads"], config["head"]
    h = heads.index(head)
    attrs = f"{n_elements}x0e"
    channels = e3nn.Irreps(config["hidden_irreps"]).count("0e")
    sh = str(sh_irreps(config["max_ell"]))

    # E0s, scale/shift: the chosen head's slice.
    e0 = m.tensor("atomic_energies_fn.atomic_energies")
    m.put("constants", "atomic_energies", "atomic_energies_fn.atomic_energies", h * n_elements if e0.ndim == 2 else 0,
          (h + 1) * n_elements if e0.ndim == 2 else n_elements, (n_elements,))
    if config["mace_class"] == "ScaleShiftMACE":
        for name in ("scale", "shift"):
            value = m.tensor(f"scale_shift.{name}")
            index = h if value.size > 1 else 0
            m.put("constants", f"scale_shift/{name}", f"scale_shift.{name}", index, index + 1, ())

    m.linear("node_embedding", "node_embedding.linear", model.node_embedding.linear, attrs, f"{channels}x0e")
    m.put("constants", "radial_embedding/bessel_weights", "radial_embedding.bessel_fn.bessel_weights")
    m.put("constants", "radial_embedding/prefactor", "radial_embedding.bessel_fn.prefactor")
    m.put("constants", "radial_embedding/r_max", "radial_embedding.cutoff_fn.r_max")
    if config["distance_transform"] == "Agnesi":
        for name in ("a", "q", "p", "covalent_radii"):
            m.put("constants", f"radial_embedding/agnesi/{name}", f"radial_embedding.distance_transform.{name}")
    if config["pair_repulsion"]:
        for name in ("c", "a_exp", "a_prefactor", "covalent_radii"):
            m.put("constants", f"pair_repulsion/{name}", f"pair_repulsion_fn.{name}")

    n_bessel = config["num_bessel"]
    for t, layer in enumerate(layers):
        key, leaf = f"interactions.{t}", f"interactions_{t}"
        block = model.interactions[t]
        residual = "Residual" in layer.interaction
        m.check_irreps(f"{key}.target_irreps", block.target_irreps, layer.target)
        m.check_irreps(f"{key}.hidden_irreps", block.hidden_irreps, layer.hidden_out)
        if "Density" not in layer.interaction:  # density blocks normalise by the learnt density instead
            m.put_attribute(f"{leaf}/avg_num_neighbors", f"{key}.avg_num_neighbors", float(block.avg_num_neighbors))
        m.linear(f"{leaf}/linear_up", f"{key}.linear_up", block.linear_up, layer.node_feats, layer.node_feats)
        numel = m.conv_tp(f"{leaf}/conv_tp", f"{key}.conv_tp", block.conv_tp, layer.node_feats, sh, layer.target)
        hs = [n_bessel, *config["radial_MLP"], numel]
        m.fc_net(f"{leaf}/conv_tp_weights", f"{key}.conv_tp_weights", block.conv_tp_weights, hs, act_used=True)
        if "Density" in layer.interaction:
            m.fc_net(f"{leaf}/density_fn", f"{key}.density_fn", block.density_fn, [n_bessel, 1], act_used=False)
        irreps_mid = str(conv_tp_structure(e3nn.Irreps(layer.node_feats), e3nn.Irreps(sh), e3nn.Irreps(layer.target))[0])
        m.linear(f"{leaf}/linear", f"{key}.linear", block.linear, irreps_mid, layer.target)
        if residual:
            m.fctp(f"{leaf}/skip_tp", f"{key}.skip_tp", block.skip_tp, layer.node_feats, attrs, layer.hidden_out)
        else:
            m.fctp(f"{leaf}/skip_tp", f"{key}.skip_tp", block.skip_tp, layer.target, attrs, layer.target)

        key, leaf = f"products.{t}", f"products_{t}"
        product = model.products[t]
        contraction = product.symmetric_contractions
        m.check_irreps(f"{key}.symmetric_contractions.irreps_in", contraction.irreps_in, layer.target)
        m.check_irreps(f"{key}.symmetric_contractions.irreps_out", contraction.irreps_out, layer.hidden_out)
        for o, (_, ir) in enumerate(e3nn.Irreps(layer.hidden_out)):
            prefix = f"{key}.symmetric_contractions.contractions.{o}"
            for nu in range(1, layer.correlation + 1):
                m.put("constants", f"{leaf}/symmetric_contractions/U[{ir},nu={nu}]", f"{prefix}.U_matrix_{nu}")
                # mace keeps nu = correlation in weights_max, then nu = correlation-1, ..., 1 in weights.0, 1, ...
                if nu == layer.correlation:
                    weight = f"{prefix}.weights_max"
                else:
                    weight = f"{prefix}.weights.{layer.correlation - 1 - nu}"
                m.put("params", f"{leaf}/symmetric_contractions/w[{ir},nu={nu}]", weight)
        m.linear(f"{leaf}/linear", f"{key}.linear", product.linear, layer.hidden_out, layer.hidden_out)

    if len(model.readouts) != len(readouts):
        raise m.fail("readouts", f"{len(model.readouts)} readout blocks where the model derives {len(readouts)}")
    out = f"{len(heads)}x0e"
    for t, readout in enumerate(readouts):
        key, leaf = f"readouts.{t}", f"readouts_{t}"
        record = model.readouts[t]
        if readout.nonlinear != (_class_name(record) == "NonLinearReadoutBlock"):
            raise m.fail(key, f"{_class_name(record)} where the model derives a {'non-' * readout.nonlinear}linear readout")
        if not readout.nonlinear:
            m.linear(f"{leaf}/linear", f"{key}.linear", record.linear, readout.irreps_in, out)
            continue
        m.linear(f"{leaf}/linear_1", f"{key}.linear_1", record.linear_1, readout.irreps_in, readout.mlp)
        m.linear(f"{leaf}/linear_2", f"{key}.linear_2", record.linear_2, readout.mlp, out)
        if config["gate"] is not None:
            act = list(record.non_linearity.acts)[0]
            m.put_attribute(f"{leaf}/act_norm", f"{key}.non_linearity.acts.0.cst", 1.0 if act._is_id else float(act.cst))
    return m


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *scopes, name = path.split("/")
        node = tree
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[name] = value
    return tree


def _check_against_module(path: Path, config: dict, variables: dict) -> None:
    """Every leaf the Flax module declares is filled, with its shape, and nothing else."""
    import jax

    module = MACE.from_config({**config, "dtype": "float32"})  # shapes only; float32 needs no jax_enable_x64
    n_edges = 4
    args = (
        np.ones((n_edges, 3)),
        np.zeros(2, dtype=np.int32),
        np.array([0, 1, 0, 1], dtype=np.int32),
        np.array([1, 0, 1, 0], dtype=np.int32),
    )
    expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))

    def shapes(tree):
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    want, have = shapes(expected), shapes(variables)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        raise CheckpointError(
            f"{path}: converted variables do not match the Flax MACE: missing {missing[:5]}, extra {extra[:5]}, "
            f"misshaped {[(k, have[k], want[k]) for k in wrong[:5]]}"
        )


def convert(path: str | Path, *, dtype: str = "float64", head: str | None = None, trust: bool = False):
    """(config, variables) of the Flax MACE reproducing a mace-torch `.model` file.

    Args:
        path: a `.model` file (`torch.save` of a mace `MACE`/`ScaleShiftMACE`).
        dtype: "float64" or "float32": every float leaf is cast to it.
        head: head of a multi-head model; default the only head.
        trust: admit globals outside the reader's allowlist (still never run).

    Raises:
        CheckpointError: not a MACE model, corrupt, cuequivariance layout,
            ambiguous or unknown head, structure that does not match.
        UnsupportedModelError: an option the Flax MACE does not reproduce,
            naming the option and the class.
    """
    path = Path(path)
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, not {dtype!r}")
    model = _load_model(path, trust)
    sd = module_state_dict(model)
    config = _read_config(path, model, sd, head)
    config["dtype"] = dtype
    check_supported(config, where=str(path))
    mapper = _map_variables(path, model, sd, config)
    variables = {"params": _nest(mapper.params), "constants": _nest(mapper.constants)}
    _check_against_module(path, config, variables)
    variables = {
        collection: _cast(tree, np.dtype(dtype)) for collection, tree in variables.items()
    }
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    config["source"] = {"file": path.name, "sha256": digest, "kind": "mace", "class": config["mace_class"]}
    config["torch_names"] = mapper.names
    return config, variables


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype=dtype)
