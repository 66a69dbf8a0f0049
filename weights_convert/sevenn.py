"""SevenNet (sevenn 0.13) checkpoint -> Flax `NequIP` config and variables.

The `.pth` file is read with `torch.load(weights_only=True)`; the only
globals allowed beyond torch's defaults are numpy's array reconstruction
(SevenNet stores shift/scale as numpy arrays in its config), which builds
plain arrays and runs no code. The model is then rebuilt the way sevenn
itself runs it after loading: `sevenn.checkpoint._config_cp_routine` fills
the config, `build_E3_equivariant_model` builds the torch modules (no
pickled code involved) and `patch_state_dict_if_old` reorders and re-signs
old convolution weights for the e3nn wigner_3j sign change. Structure
(irreps, gates, activation constants) is read from those torch modules, the
numbers from their state dict, so the Flax model follows the runtime model.

`torch_names` maps each Flax leaf "params/layer_0/linear_1/w[0,0]" (and each
constant read from the checkpoint) to [state_dict key, start, stop, shape]:
leaf = state_dict[key].reshape(-1)[start:stop].reshape(shape), with keys and
layouts of the sevenn 0.13 model *after* `patch_state_dict_if_old`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from sparse_eqv.errors import CheckpointError, UnsupportedModelError
from sparse_eqv.models.nequip import NequIP, layer_output_irreps

_BUNDLED = {
    "7net-0": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
    "7net-0_11jul2024": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
    "7net-0_22may2024": "SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
    "7net-l3i5": "SevenNet_l3i5/checkpoint_l3i5.pth",
    "7net-mf-0": "SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
}


def bundled_names() -> list[str]:
    """The names of the checkpoints shipped inside the sevenn package (`7net-0`, ...)."""
    return list(_BUNDLED)


def resolve_bundled(name: str) -> Path | None:
    """Path of a checkpoint shipped inside the sevenn package (`7net-0`, ...), or None."""
    key = str(name).strip().lower()
    if key not in _BUNDLED:
        return None
    spec = importlib.util.find_spec("sevenn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_potentials" / _BUNDLED[key]
    return path if path.is_file() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True, allowing numpy arrays in the config."""
    import torch
    from numpy._core.multiarray import _reconstruct

    safe = [(_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    safe += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    try:
        with torch.serialization.safe_globals(safe):
            cp = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}: {first[:300]}). "
            "A SevenNet .pth checkpoint (as written by `sevenn train`) is expected; deployed TorchScript "
            "files (`sevenn_get_model`) cannot be converted."
        ) from None
    if not isinstance(cp, dict) or "model_state_dict" not in cp or "config" not in cp:
        keys = sorted(cp)[:8] if isinstance(cp, dict) else type(cp).__name__
        raise CheckpointError(
            f"{path}: not a SevenNet checkpoint (expected a dict with 'config' and 'model_state_dict', found {keys})"
        )
    if "version" not in cp["config"]:
        raise CheckpointError(f"{path}: config has no sevenn 'version'; not a SevenNet checkpoint")
    return cp


def _runtime_model(cp: dict[str, Any], path: Path):
    """(config, torch model, state dict) as sevenn runs the checkpoint after loading."""
    import sevenn._keys as KEY
    import sevenn.scripts.backward_compatibility as compat
    import torch
    from sevenn.checkpoint import _config_cp_routine
    from sevenn.model_build import build_E3_equivariant_model

    config = _config_cp_routine(copy.deepcopy(cp["config"]))
    for flag, what in ((config.get(KEY.CUEQUIVARIANCE_CONFIG, {}).get("use", False), "cuEquivariance"),
                       (config.get(KEY.USE_FLASH_TP, False), "FlashTP"), (config.get(KEY.USE_OEQ, False), "OpenEquivariance")):
        if flag:
            raise UnsupportedModelError(f"{path}: saved with the {what} backend; convert it to e3nn with sevenn first")
    if config.get(KEY.INTERACTION_TYPE, "nequip") != "nequip":
        raise UnsupportedModelError(f"{path}: interaction_type {config[KEY.INTERACTION_TYPE]!r} (only 'nequip')")
    if config.get(KEY.READOUT_AS_FCN, False):
        raise UnsupportedModelError(f"{path}: readout_as_fcn=True is not implemented (only the linear readout)")
    if config.get(KEY.USE_BIAS_IN_LINEAR, False):
        raise UnsupportedModelError(f"{path}: use_bias_in_linear=True is not implemented")
    config[KEY.CUEQUIVARIANCE_CONFIG] = {"use": False}
    # sevenn builds in torch's default dtype and compares its CG blocks with the
    # checkpoint's float32 ones: build as sevenn does, whatever an earlier
    # conversion in this process (nequip sets float64) left as the default.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = build_E3_equivariant_model(config)
        state = compat.patch_state_dict_if_old(
            {k: v.clone() for k, v in cp["model_state_dict"].items()}, config, model
        )
    finally:
        torch.set_default_dtype(default_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return config, model, {k: v.detach().cpu().to(dtype=v.dtype) for k, v in model.state_dict().items()}


def _irreps(irreps) -> str:
    return "+".join(f"{mul}x{ir}" for mul, ir in irreps)


def _act_name(fn) -> str:
    """Name of a sevenn activation function (as keys of sparse_eqv's table)."""
    import sevenn._const as const

    for name, f in const.ACTIVATION.items():
        if f is fn:
            return name
    raise UnsupportedModelError(f"activation {fn!r} is not one sevenn names")


def _act_scale(act) -> float:
    """The constant e3nn's normalize2mom multiplies by (1 when it is skipped)."""
    return 1.0 if act._is_id else float(act.cst)


class _Collector:
    """Fills params / constants and the torch-name mapping, with size checks."""

    def __init__(self, state: dict, dtype: str, path: Path):
        self.state, self.dtype, self.path = state, dtype, path
        self.params: dict = {}
        self.constants: dict = {}
        self.torch_names: dict[str, list] = {}

    def _put(self, tree: dict, kind: str, where: tuple[str, ...], value: np.ndarray, source: list | None):
        node = tree
        for part in where[:-1]:
            node = node.setdefault(part, {})
        node[where[-1]] = np.asarray(value, dtype=self.dtype)
        if source is not None:
            self.torch_names["/".join((kind,) + where)] = source

    def from_state(self, kind: str, where: tuple[str, ...], key: str, start: int, shape: tuple[int, ...]):
        if key not in self.state:
            raise CheckpointError(f"{self.path}: state dict lacks {key!r}")
        flat = self.state[key].double().reshape(-1).numpy()
        stop = start + int(np.prod(shape))
        if stop > flat.size:
            raise CheckpointError(f"{self.path}: {key} has {flat.size} numbers, need {stop} for {'/'.join(where)}")
        tree = self.params if kind == "params" else self.constants
        self._put(tree, kind, where, flat[start:stop].reshape(shape), [key, start, stop, list(shape)])
        return stop

    def constant(self, where: tuple[str, ...], value):
        self._put(self.constants, "constants", where, np.asarray(value), None)

    def checked_variables(self, config: dict[str, Any]) -> dict[str, Any]:
        """The collected {"params", "constants"}, checked against the Flax `NequIP`
        built from `config`: each layer's output irreps are the next layer's input
        irreps, and the leaves and their shapes are exactly those `module.init` makes.

        Raises:
            CheckpointError naming the checkpoint file.
        """
        module = NequIP.from_config(config)
        for t, spec in enumerate(module.layers[:-1]):
            if layer_output_irreps(spec) != module.layers[t + 1].irreps_in:
                raise CheckpointError(f"{self.path}: layer {t} output irreps do not match layer {t + 1} input")
        variables = {"params": self.params, "constants": self.constants}
        check_variables(module, variables, str(self.path))
        return variables


def _linear(col: _Collector, where: tuple[str, ...], key: str, linear) -> None:
    """e3nn o3.Linear weights: one leaf w[i_in,i_out] per instruction, in flat order."""
    start = 0
    if linear.bias.numel():
        raise UnsupportedModelError(f"{col.path}: {key} has biases (not implemented)")
    for ins in linear.instructions:
        start = col.from_state("params", where + (f"w[{ins.i_in},{ins.i_out}]",), key, start, tuple(ins.path_shape))
    if start != col.state[key].numel():
        raise CheckpointError(f"{col.path}: {key} has {col.state[key].numel()} weights, instructions use {start}")


def _fc_tensor_product(col: _Collector, where: tuple[str, ...], key: str, tp) -> None:
    start = 0
    for ins in tp.instructions:
        if ins.connection_mode != "uvw" or tp.irreps_in2[ins.i_in2].ir.l != 0:
            raise UnsupportedModelError(f"{col.path}: {key}: only x (x) scalar-attribute 'uvw' self-connections")
        start = col.from_state(
            "params", where + (f"w[{ins.i_in1},{ins.i_in2},{ins.i_out}]",), key, start, tuple(ins.path_shape)
        )
    if start != col.state[key].numel():
        raise CheckpointError(f"{col.path}: {key} has {col.state[key].numel()} weights, instructions use {start}")


def _cg_constants(col: _Collector, where: tuple[str, ...], key: str, tp) -> None:
    """The Clebsch-Gordan block cg_{l1}_{l2}_{l3} of each instruction of the e3nn
    TensorProduct `tp`: the checkpoint's buffer `{key}._w3j_{l1}_{l2}_{l3}`, or
    e3nn's wigner_3j where the checkpoint has none."""
    import torch
    from e3nn.o3 import wigner_3j

    for ins in tp.instructions:
        ls = (tp.irreps_in1[ins.i_in1].ir.l, tp.irreps_in2[ins.i_in2].ir.l, tp.irreps_out[ins.i_out].ir.l)
        buffer = f"{key}._w3j_{ls[0]}_{ls[1]}_{ls[2]}"
        cg = where + (f"cg_{ls[0]}_{ls[1]}_{ls[2]}",)
        if buffer in col.state:
            col.from_state("constants", cg, buffer, 0, tuple(col.state[buffer].shape))
        else:  # e3nn's specialised code path (an l = 0) uses this block implicitly
            col.constant(cg, wigner_3j(*ls, dtype=torch.float64).numpy())


def _fcn(col: _Collector, where: tuple[str, ...], prefix: str, fcn) -> None:
    """e3nn FullyConnectedNet: leaves layer{k} (h_in, h_out) and its activation constant."""
    for k in range(len(fcn.hs) - 1):
        layer = getattr(fcn, f"layer{k}")
        col.from_state("params", where + (f"layer{k}",), f"{prefix}.layer{k}.weight", 0, tuple(layer.weight.shape))
        if layer.act is not None:
            col.constant(where + ("act_scale",), _act_scale(layer.act))


def _gate_spec(gate_module, act_scalar: dict, act_gate: dict) -> tuple[dict, dict]:
    """GateSpec fields from sevenn's EquivariantGate and the activation constants."""
    gate = gate_module.gate
    parity = {1: "e", -1: "o"}
    spec = {
        "scalars": _irreps(gate.irreps_scalars),
        "act_scalars": [act_scalar[parity[ir.p]] for _, ir in gate.irreps_scalars],
        "gates": _irreps(gate.irreps_gates),
        "act_gates": [act_gate[parity[ir.p]] for _, ir in gate.irreps_gates],
        "gated": _irreps(gate.irreps_gated),
    }
    scales = {}
    for act in list(gate.act_scalars.acts) + list(gate.act_gates.acts):
        if act is not None:
            scales[f"act_scale_{_act_name(act.f)}"] = _act_scale(act)
    return spec, scales


def convert(path, *, dtype: str = "float64", head: str | None = None, trust: bool = False):
    """SevenNet checkpoint (or bundled name, e.g. "7net-0") -> (config, variables).

    Args:
        path: `.pth` checkpoint written by sevenn, or a bundled model name.
        dtype: "float64" or "float32" for every leaf.
        head: modality of a multi-fidelity model (SevenNet-MF-0: "PBE" or "R2SCAN"),
            fixed at conversion: the one-hot becomes a constant input.
        trust: unused; SevenNet checkpoints are read weights-only.
    """
    import sevenn._keys as KEY


    bundled = resolve_bundled(str(path))
    path = bundled if bundled is not None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (bundled names: {', '.join(_BUNDLED)})")
    if dtype not in ("float32", "float64"):
        raise UnsupportedModelError(f"dtype {dtype!r}: use float32 or float64")
    cp = load_checkpoint(path)
    modal_index, num_modalities = None, 0
    if cp["config"].get(KEY.USE_MODALITY, False):
        modal_map = dict(cp["config"].get(KEY.MODAL_MAP, {}))
        if head not in modal_map:
            raise UnsupportedModelError(
                f"{path}: multi-fidelity SevenNet: choose the modality with head= (one of {', '.join(modal_map)}); "
                f"got {head!r}"
            )
        modal_index, num_modalities = int(modal_map[head]), len(modal_map)
        if cp["config"].get(KEY.USE_MODAL_NODE_EMBEDDING, False):
            raise UnsupportedModelError(f"{path}: modality-dependent node embedding is not implemented")
    elif head is not None:
        raise UnsupportedModelError(f"{path}: single-fidelity model, it has no head/modality {head!r}")
    config, model, state = _runtime_model(cp, path)
    col = _Collector(state, dtype, path)
    mods = model._modules
    type_map = config[KEY.TYPE_MAP]
    atomic_numbers = [int(z) for z in sorted(type_map, key=type_map.get)]
    num_types = len(atomic_numbers)

    edge = mods["edge_embedding"]
    cutoff_module = edge.cutoff_function
    if type(cutoff_module).__name__ == "XPLORCutoff":
        cutoff, cutoff_arg = "xplor", float(cutoff_module.r_on)
    elif type(cutoff_module).__name__ == "PolynomialCutoff":
        cutoff, cutoff_arg = "polynomial", float(cutoff_module.p)
    else:
        raise UnsupportedModelError(f"{path}: cutoff function {type(cutoff_module).__name__}")
    if type(edge.basis_function).__name__ != "BesselBasis":
        raise UnsupportedModelError(f"{path}: radial basis {type(edge.basis_function).__name__}")
    r_max = float(config[KEY.CUTOFF])
    if not np.isclose(edge.basis_function.prefactor, 2.0 / r_max):
        raise CheckpointError(f"{path}: Bessel prefactor does not match cutoff {r_max}")
    col.from_state("constants", ("bessel_k",), "edge_embedding.basis_function.coeffs", 0, (edge.basis_function.num_basis,))

    embed = mods["onehot_to_feature_x"].linear
    col.from_state("params", ("embedding",), "onehot_to_feature_x.linear.weight", 0, (num_types, embed.irreps_out.dim))

    act_scalar = {k: _act_name(v) for k, v in _sevenn_acts(config[KEY.ACTIVATION_SCARLAR]).items()}
    act_gate = {k: _act_name(v) for k, v in _sevenn_acts(config[KEY.ACTIVATION_GATE]).items()}
    act_radial = _act_name(mods["0_convolution"].weight_nn_kwargs["act"])
    layers = []
    for t in range(config[KEY.NUM_CONVOLUTION]):
        name = f"layer_{t}"
        conv = mods[f"{t}_convolution"]
        sc_module = mods[f"{t}_self_connection_intro"]
        sc_kind = {"SelfConnectionLinearIntro": "linear", "SelfConnectionIntro": "tensor_product"}.get(
            type(sc_module).__name__
        )
        if sc_kind is None:
            raise UnsupportedModelError(f"{path}: self connection {type(sc_module).__name__}")
        if sc_kind == "linear":
            _linear(col, (name, "self_connection"), f"{t}_self_connection_intro.linear.weight", sc_module.linear)
        else:
            _fc_tensor_product(
                col, (name, "self_connection"), f"{t}_self_connection_intro.fc_tensor_product.weight", sc_module.fc_tensor_product
            )
        modal_linears = []
        for flax_name, torch_name in (("linear_1", f"{t}_self_interaction_1"), ("linear_2", f"{t}_self_interaction_2")):
            _linear(col, (name, flax_name), f"{torch_name}.linear.weight", mods[torch_name].linear)
            if mods[torch_name].num_modalities > 1:
                modal_linears.append(flax_name)
        _fcn(col, (name, "radial"), f"{t}_convolution.weight_nn", conv.weight_nn)
        col.from_state("constants", (name, "post_norm"), f"{t}_convolution.denominator", 0, ())
        col.constant((name, "pre_norm"), np.ones(num_types))
        tp = conv.convolution
        _cg_constants(col, (name,), f"{t}_convolution.convolution._compiled_main_left_right", tp)
        gate, scales = _gate_spec(mods[f"{t}_equivariant_gate"], act_scalar, act_gate)
        for key, value in scales.items():
            col.constant((name, "gate", key), value)
        layers.append({
            "irreps_in": _irreps(tp.irreps_in1),
            "gate": gate,
            "radial": {"hidden": list(conv.weight_nn.hs[:-1]), "kind": "e3nn", "act": act_radial},
            "self_connection": sc_kind,
            "sort_instructions": True,
            "resnet": False,
            "modal_linears": modal_linears,
        })

    hidden = mods["reduce_input_to_hidden"].linear
    energy = mods["reduce_hidden_to_energy"].linear
    _linear(col, ("readout_0",), "reduce_input_to_hidden.linear.weight", hidden)
    _linear(col, ("readout_1",), "reduce_hidden_to_energy.linear.weight", energy)
    if mods["reduce_hidden_to_energy"].num_modalities > 1:
        raise UnsupportedModelError(f"{path}: modality-dependent energy output layer is not implemented")
    hidden_in = mods["reduce_input_to_hidden"]._irreps_in_wo_modal.dim
    rescale = mods["rescale_atomic_energy"]
    for what in ("scale", "shift"):
        values = getattr(rescale, what).detach().double().numpy()
        modal_wise = values.ndim == 2
        row = modal_index if modal_wise else 0
        if values.size == 1:
            col.constant((what,), np.full(num_types, values.reshape(-1)[0]))
        else:
            col.from_state("constants", (what,), f"rescale_atomic_energy.{what}", row * num_types, (num_types,))
    if num_modalities:
        col.constant(("modality",), np.eye(num_modalities)[modal_index])

    sph = edge.spherical
    flax_config = {
        "model": "sevenn",
        "atomic_numbers": atomic_numbers,
        "r_max": r_max,
        "dtype": dtype,
        "embedding": {"features": embed.irreps_out.dim, "scale": 1.0 / np.sqrt(num_types), "node_attrs": "one_hot"},
        "radial_basis": {"num_basis": edge.basis_function.num_basis, "cutoff": cutoff, "cutoff_arg": cutoff_arg},
        "irreps_sh": _irreps(sph.irreps_out),
        "sh_normalize": bool(sph.sph.normalize),
        "layers": layers,
        "readout": {"dims": [hidden_in, hidden.irreps_out.dim, 1], "kind": "linear", "act": None},
        "zbl_p": None,
        "source": {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "kind": "sevenn",
            "sevenn_version": str(config.get("version")),
        },
        "torch_names": col.torch_names,
    }
    if num_modalities:
        flax_config["modality"] = {
            "name": head, "index": modal_index, "count": num_modalities,
            "readout": mods["reduce_input_to_hidden"].num_modalities > 1,
        }
    return flax_config, col.checked_variables(flax_config)


def _sevenn_acts(names: dict) -> dict:
    import sevenn._const as const

    return {parity: const.ACTIVATION_DICT[parity][name] for parity, name in names.items()}


def check_variables(module, variables: dict, where: str) -> None:
    """Raise CheckpointError unless `variables` has exactly the leaves `module.init` makes."""
    import jax
    import jax.numpy as jnp

    def shapes(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
                for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    vectors = jnp.ones((2, 3)) * jnp.array([1.0, 0.5, 0.25])
    species = jnp.zeros((2,), jnp.int32)
    index = jnp.array([0, 1], jnp.int32)
    expected = shapes(jax.eval_shape(module.init, jax.random.PRNGKey(0), vectors, species, index, index[::-1]))
    found = shapes(variables)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {items[:6]}" for label, items in (("missing", missing), ("extra", extra), ("misshaped", wrong)) if items
        )
        raise CheckpointError(f"{where}: converted variables do not match the Flax model ({detail})")
