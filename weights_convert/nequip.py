"""nequip 0.19.1 models -> Flax `NequIP` config and variables.

Accepted inputs:
  * `.ckpt` (a training checkpoint written by `nequip-train`, Lightning):
    read with `torch.load(weights_only=True)`. The model is rebuilt with
    nequip's own builder from the checkpoint's model config -- only the
    builders `nequip.model.NequIPGNNModel`, `FullNequIPGNNModel`,
    `PresetNequIPGNNModel` and the ZBL pair potential are accepted as
    `_target_`, so the file cannot name other code to run -- and then loaded
    with the state dict, using the EMA weights when an EMA training module
    saved them (as nequip's `ModelFromCheckpoint` evaluates it).
  * `.nequip.zip` (a `nequip-package` file): a torch.package archive whose
    model is a pickle that imports the Python code stored in the archive. Loading
    it runs that code with your user's rights, so it is refused unless
    `trust=True`.
  * AOT/TorchScript-compiled files (`.nequip.pt2`, `.nequip.pth`) hold
    compiled kernels, not a module tree, and cannot be converted: bring the
    `.ckpt` (or the `.nequip.zip`) the compiled file was made from.

`torch_names` maps each Flax leaf to [state_dict key, start, stop, shape] of
the nequip `GraphModel` state dict (keys as `model.state_dict()` of the
evaluation model, e.g. "model.func.layer0_convnet.conv.linear_1.weight"):
leaf = state_dict[key].reshape(-1)[start:stop].reshape(shape).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sparse_eqv.errors import CheckpointError, UnsupportedModelError
from sparse_eqv.models.nequip import MLPSpec, conv_instructions, parse_irreps
from weights_convert.sevenn import _act_scale, _cg_constants, _Collector, _fc_tensor_product, _irreps
from weights_convert.sevenn import _linear as linear_leaves

_BUILDERS = {
    "nequip.model.NequIPGNNModel",
    "nequip.model.FullNequIPGNNModel",
    "nequip.model.PresetNequIPGNNModel",
    "nequip.model.nequip_models.NequIPGNNModel",
    "nequip.model.nequip_models.FullNequIPGNNModel",
    "nequip.model.nequip_models.PresetNequIPGNNModel",
}
_PAIR_POTENTIALS = {"nequip.nn.pair_potential.ZBL", "nequip.nn.ZBL"}
_TRUST_MESSAGE = (
    "is a nequip-package archive (torch.package): loading it unpickles the model and imports the Python "
    "code stored inside the archive, which runs with your user's rights. Convert it with trust=True "
    "(CLI: --trust-checkpoint) only if you trust whoever made the file, or convert the training checkpoint (.ckpt) instead, "
    "which is read weights-only."
)


def _load_ckpt(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}: {last[:300]}); "
            "a nequip training checkpoint (.ckpt from nequip-train) is expected"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(
            f"{path}: not a nequip training checkpoint (no hyper_parameters.model / state_dict; "
            f"found keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})"
        )
    return ckpt


def _model_from_ckpt(path: Path, ckpt: dict[str, Any]):
    """(GraphModel, {name: tensor}) as nequip evaluates the checkpoint."""
    import torch
    from hydra.utils import get_method
    from nequip.utils.global_state import set_global_state

    model_config = dict(ckpt["hyper_parameters"]["model"])
    target = model_config.pop("_target_", None)
    if target not in _BUILDERS:
        raise UnsupportedModelError(
            f"{path}: model `_target_` {target!r} is not a NequIP builder ({', '.join(sorted(_BUILDERS)[:3])}); "
            "fine-tuned models (ModelFromCheckpoint/ModelFromPackage) must be converted from their own checkpoint"
        )
    pair = model_config.get("pair_potential")
    if pair is not None and pair.get("_target_") not in _PAIR_POTENTIALS:
        raise UnsupportedModelError(f"{path}: pair potential {pair.get('_target_')!r} (only ZBL)")
    if model_config.get("categorical_graph_field_embed"):
        raise UnsupportedModelError(f"{path}: categorical_graph_field_embed is not implemented")
    set_global_state()
    model = get_method(target)(**model_config)
    if isinstance(model, torch.nn.ModuleDict):
        raise UnsupportedModelError(f"{path}: multi-model checkpoints are not supported")

    prefix = "model.sole_model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: state_dict has no '{prefix}*' entries")
    ema_keys = [k for k in ckpt["state_dict"] if k.startswith("ema.ema_weight_")]
    if ema_keys:  # EMALightningModule: evaluation uses the EMA weights
        names = [n for n, _ in model.named_parameters()]
        if len(ema_keys) != len(names):
            raise CheckpointError(f"{path}: {len(ema_keys)} EMA weights for {len(names)} model parameters")
        for i, name in enumerate(names):
            state[name] = ckpt["state_dict"][f"ema.ema_weight_{i}"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise CheckpointError(f"{path}: state dict does not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _model_from_package(path: Path):
    from nequip.model.saved_models.package import ModelFromPackage
    from nequip.utils.global_state import set_global_state

    set_global_state()
    model = ModelFromPackage(str(path), compile_mode="eager")
    if hasattr(model, "keys"):
        if len(model) != 1:
            raise UnsupportedModelError(f"{path}: packages with several models are not supported")
        model = next(iter(model.values()))
    return model


def _act_name(fn) -> str:
    from nequip.nn import convnetlayer

    for name, f in convnetlayer.acts.items():
        if f is fn:
            return name
    raise UnsupportedModelError(f"gate activation {fn!r} is not one nequip names")


def _scalar_mlp(col: _Collector, where, prefix: str, mlp_function) -> dict:
    """nequip ScalarMLPFunction -> MLPSpec fields and leaves layer{k}."""
    mlp = mlp_function.mlp
    if hasattr(mlp, "weights"):  # DeepLinearMLP: product of linear layers, no nonlinearity
        weights, act = [f"{prefix}.mlp.weights.{k}" for k in range(len(mlp.weights))], None
        alpha_product = float(mlp.alpha)
    else:
        layers = [(i, m) for i, m in enumerate(mlp) if type(m).__name__ == "ScalarLinearLayer"]
        acts = {type(m).__name__ for m in mlp if type(m).__name__ != "ScalarLinearLayer"}
        if any(m.bias is not None for _, m in layers):
            raise UnsupportedModelError(f"{col.path}: {prefix} has biases (not implemented)")
        if acts - {"SiLU"}:
            raise UnsupportedModelError(f"{col.path}: {prefix} nonlinearity {acts} (only SiLU)")
        weights, act = [f"{prefix}.mlp.{i}.weight" for i, _ in layers], ("silu" if acts else None)
        alpha_product = None
    dims = list(mlp_function.dims)
    spec = MLPSpec(tuple(dims), "nequip", act)
    if alpha_product is not None and not np.isclose(np.prod(spec.alphas()), alpha_product, rtol=1e-6):
        raise UnsupportedModelError(f"{col.path}: {prefix} weight scaling differs from forward_weight_init")
    if alpha_product is None:
        for (_, layer), alpha in zip(layers, spec.alphas()):
            if not np.isclose(float(layer.alpha), alpha, rtol=1e-6):
                raise UnsupportedModelError(f"{col.path}: {prefix} weight scaling differs from forward_weight_init")
    for k, key in enumerate(weights):
        col.from_state("params", where + (f"layer{k}",), key, 0, (dims[k], dims[k + 1]))
    return {"dims": dims, "act": act}


def _linear(col: _Collector, where, key: str, linear) -> None:
    linear_leaves(col, where, key, linear)


def convert(path, *, dtype: str = "float64", head: str | None = None, trust: bool = False):
    """nequip `.ckpt` or (trusted) `.nequip.zip` -> (config, variables)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if dtype not in ("float32", "float64"):
        raise UnsupportedModelError(f"dtype {dtype!r}: use float32 or float64")
    name = path.name.lower()
    if (".nequip." in name and name.endswith((".pt2", ".pth"))) or _is_compiled_archive(path):
        raise UnsupportedModelError(
            f"{path}: a compiled nequip model (nequip-compile, AOTInductor/TorchScript) holds compiled kernels, "
            "not the module tree and weights in a convertible form. Convert the training checkpoint (.ckpt) "
            "or the package (.nequip.zip) it was compiled from."
        )
    if zipfile.is_zipfile(path) and not _is_torch_save_zip(path):
        if not trust:
            raise CheckpointError(f"{path} {_TRUST_MESSAGE}")
        model = _model_from_package(path)
        kind = "nequip-package"
    else:
        model = _model_from_ckpt(path, _load_ckpt(path))
        kind = "nequip-ckpt"
    if head is not None:
        raise UnsupportedModelError(f"{path}: nequip models have no heads (head={head!r})")

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # non-persistent buffers (alpha, norm_const) are read from the modules themselves
    col = _Collector(state, dtype, path)
    net = model.model.func
    mods = dict(net.named_children())
    allowed = {"type_embed", "spharm", "edge_norm", "bessel_encode", "factor", "per_atom_energy_readout",
               "per_type_energy_scale_shift", "pair_potential", "total_energy_sum"}
    layer_names = [n for n in mods if n.startswith("layer") and n.endswith("_convnet")]
    extra = set(mods) - allowed - set(layer_names)
    if extra:
        raise UnsupportedModelError(f"{path}: modules {sorted(extra)} are not part of the NequIP model implemented here")
    base = "model.func"
    type_names = list(model.type_names)
    num_types = len(type_names)

    edge_norm = mods["edge_norm"]
    if edge_norm._per_edge_type:
        raise UnsupportedModelError(f"{path}: per_edge_type_cutoff is not implemented")
    r_max = float(edge_norm.r_max)
    bessel = mods["bessel_encode"]
    if not np.isclose(float(mods["factor"].factor), 2 * np.pi / r_max**2, rtol=1e-12):
        raise UnsupportedModelError(f"{path}: Bessel prefactor {float(mods['factor'].factor)} is not 2 pi / r_max^2")
    bessel_w = bessel.bessel_weights.detach().double().numpy().reshape(-1)
    col.constant(("bessel_k",), bessel_w * np.pi / r_max)
    col.torch_names["constants/bessel_k"] = [f"{base}.bessel_encode.bessel_weights", 0, bessel_w.size, [bessel_w.size]]
    cutoff_p = float(bessel.cutoff.p)
    sph = mods["spharm"].sh
    if sph.normalization != "component":
        raise UnsupportedModelError(f"{path}: spherical harmonics normalization {sph.normalization!r}")

    embed = mods["type_embed"].embed_module
    col.from_state("params", ("embedding",), f"{base}.type_embed.embed_module.weight", 0, tuple(embed.weight.shape))

    layers = []
    for t, lname in enumerate(sorted(layer_names, key=lambda n: int(n[5:-8]))):
        name, layer = f"layer_{t}", mods[lname]
        prefix = f"{base}.{lname}"
        conv = layer.conv
        gate = layer.equivariant_nonlin
        if type(gate).__name__ != "Gate":
            raise UnsupportedModelError(f"{path}: {lname} nonlinearity {type(gate).__name__} (only gate)")
        tp = conv.tp_scatter.tp
        irreps_in = _irreps(tp.irreps_in1)
        act_by_parity = [
            {ir.p: _act_name(a.f) for (_, ir), a in zip(act.irreps_in, act.acts)}
            for act in (gate.act_scalars, gate.act_gates)
        ]
        spec_gate = {
            "scalars": _irreps(gate.irreps_scalars),
            "act_scalars": [act_by_parity[0][ir.p] for _, ir in gate.irreps_scalars],
            "gates": _irreps(gate.irreps_gates),
            "act_gates": [act_by_parity[1][ir.p] for _, ir in gate.irreps_gates],
            "gated": _irreps(gate.irreps_gated),
        }
        for a in list(gate.act_scalars.acts) + list(gate.act_gates.acts):
            col.constant((name, "gate", f"act_scale_{_act_name(a.f)}"), _act_scale(a))
        # the convolution paths must be the ones the Flax layer derives
        gate_in = _irreps(gate.irreps_in)
        ins, _ = conv_instructions(parse_irreps(irreps_in), parse_irreps(_irreps(tp.irreps_in2)), parse_irreps(gate_in), False)
        torch_ins = [(i.i_in1, i.i_in2, i.i_out) for i in tp.instructions]
        if ins != torch_ins or any(i.connection_mode != "uvu" for i in tp.instructions):
            raise UnsupportedModelError(f"{path}: {lname} convolution paths differ from NequIP's InteractionBlock")

        sc_kind = "none"
        if conv.sc is not None:
            sc_kind = "tensor_product"
            _fc_tensor_product(col, (name, "self_connection"), f"{prefix}.conv.sc.weight", conv.sc)
        _linear(col, (name, "linear_1"), f"{prefix}.conv.linear_1.weight", conv.linear_1)
        _linear(col, (name, "linear_2"), f"{prefix}.conv.linear_2.weight", conv.linear_2)
        radial = _scalar_mlp(col, (name, "radial"), f"{prefix}.conv.edge_mlp", conv.edge_mlp)
        norm = conv.avg_num_neighbors_norm.norm_const.detach().double().numpy().reshape(-1)
        col.constant((name, "pre_norm"), np.broadcast_to(norm, (num_types,)))
        col.constant((name, "post_norm"), 1.0)
        _cg_constants(col, (name,), f"{prefix}.conv.tp_scatter.tp._compiled_main_left_right", tp)
        layers.append({
            "irreps_in": irreps_in,
            "gate": spec_gate,
            "radial": {"hidden": radial["dims"][:-1], "kind": "nequip", "act": radial["act"]},
            "self_connection": sc_kind,
            "sort_instructions": False,
            "resnet": bool(layer.resnet),
        })

    readout = _scalar_mlp(col, ("readout",), f"{base}.per_atom_energy_readout.mlp_module",
                          mods["per_atom_energy_readout"].mlp_module)
    if readout["dims"][-1] != 1:
        raise UnsupportedModelError(f"{path}: readout has {readout['dims'][-1]} outputs")
    scale_shift = mods["per_type_energy_scale_shift"]
    for what, attr, default in (("scale", "scales", 1.0), ("shift", "shifts", 0.0)):
        values = getattr(scale_shift, attr).detach().double().numpy().reshape(-1)
        if values.size == num_types:
            col.from_state("constants", (what,), f"{base}.per_type_energy_scale_shift.{attr}", 0, (num_types,))
        else:
            col.constant((what,), np.full(num_types, values[0] if values.size else default))

    atomic_numbers = _atomic_numbers(path, type_names, mods.get("pair_potential"))
    zbl_p = None
    if "pair_potential" in mods:
        pair = mods["pair_potential"]
        if type(pair).__name__ != "ZBL":
            raise UnsupportedModelError(f"{path}: pair potential {type(pair).__name__} (only ZBL)")
        if not np.isclose(float(pair._qqr2exesquare), 0.5 * 14.399645, rtol=1e-12):
            raise UnsupportedModelError(f"{path}: ZBL units other than 'metal' (eV, Å) are not implemented")
        zbl_p = float(pair.cutoff.p)
        col.from_state("constants", ("zbl_atomic_numbers",), f"{base}.pair_potential.atomic_numbers", 0, (num_types,))

    config = {
        "model": "nequip",
        "atomic_numbers": atomic_numbers,
        "type_names": type_names,
        "r_max": r_max,
        "dtype": dtype,
        "embedding": {"features": int(embed.weight.shape[1]), "scale": 1.0, "node_attrs": "embedding"},
        "radial_basis": {"num_basis": int(bessel_w.size), "cutoff": "polynomial_masked", "cutoff_arg": cutoff_p},
        "irreps_sh": _irreps(sph.irreps_out),
        "sh_normalize": bool(sph.normalize),
        "layers": layers,
        "readout": {"dims": readout["dims"], "kind": "nequip", "act": readout["act"]},
        "zbl_p": zbl_p,
        "source": {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "kind": kind},
        "torch_names": col.torch_names,
    }
    return config, col.checked_variables(config)


def _is_compiled_archive(path: Path) -> bool:
    """TorchScript (code/, constants.pkl) or AOTInductor (.pt2: data/aotinductor/) archives."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n or n.endswith("/constants.pkl") or "/aotinductor/" in n for n in names)


def _is_torch_save_zip(path: Path) -> bool:
    """torch.save archives are zips too: they hold <name>/data.pkl and no package code."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/data.pkl") for n in names) and not any("/.data/extern_modules" in n for n in names)


def _atomic_numbers(path: Path, type_names: list[str], pair) -> list[int]:
    """Z of each type: from the ZBL buffer when present, else the type names as element symbols."""
    from ase.data import atomic_numbers

    if pair is not None and hasattr(pair, "atomic_numbers"):
        return [int(round(z)) for z in pair.atomic_numbers.detach().double().tolist()]
    if all(name in atomic_numbers for name in type_names):
        return [int(atomic_numbers[name]) for name in type_names]
    raise UnsupportedModelError(
        f"{path}: type names {type_names} are not element symbols; the element of each type is unknown"
    )
