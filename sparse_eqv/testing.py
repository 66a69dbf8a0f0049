"""Small model configs and data files for the tests and the benchmark scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sparse_eqv.checkpoint import save_model
from sparse_eqv.data.frames import Frame
from sparse_eqv.inference import Predictor
from sparse_eqv.models import build_model


def tiny_sevenn_config() -> dict[str, Any]:
    """A SevenNet-architecture config small enough to compile quickly: Li, P, S,
    Ge (SSE-PBE's elements), r_max 3.5 Å, l <= 1, 4 channels, two layers, float64.

    Returns a new dict on every call (callers may change it).
    """
    return {
        "model": "sevenn",
        "atomic_numbers": [3, 15, 16, 32],
        "r_max": 3.5,
        "dtype": "float64",
        "embedding": {"features": 4, "scale": 0.5, "node_attrs": "one_hot"},
        "radial_basis": {"num_basis": 4, "cutoff": "polynomial", "cutoff_arg": 6.0},
        "irreps_sh": "1x0e+1x1o",
        "sh_normalize": True,
        "layers": [
            {
                "irreps_in": "4x0e",
                "gate": {"scalars": "4x0e", "act_scalars": ["silu"], "gates": "2x0e", "act_gates": ["sigmoid"],
                         "gated": "2x1o"},
                "radial": {"hidden": [4, 8], "kind": "e3nn", "act": "silu"},
                "self_connection": "linear",
                "sort_instructions": True,
            },
            {
                "irreps_in": "4x0e+2x1o",
                "gate": {"scalars": "4x0e", "act_scalars": ["silu"], "gates": "", "act_gates": [], "gated": ""},
                "radial": {"hidden": [4, 8], "kind": "e3nn", "act": "silu"},
                "self_connection": "tensor_product",
                "sort_instructions": True,
            },
        ],
        "readout": {"dims": [4, 2, 1], "kind": "e3nn", "act": None},
    }


def write_extxyz(path: str | Path, frames: Sequence[Frame]) -> Path:
    """The frames as extxyz with their energy (eV) and forces (eV/Å) labels; returns `path`."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    images = []
    for f in frames:
        atoms = f.to_atoms()
        atoms.calc = SinglePointCalculator(atoms, energy=f.energy, forces=f.forces)
        images.append(atoms)
    ase.io.write(path, images, format="extxyz")
    return Path(path)


def tiny_variables(seed: int = 0) -> dict[str, Any]:
    """Random variables ({"params", "constants"}, numpy) of `tiny_sevenn_config()` from PRNG `seed`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    variables = build_model(tiny_sevenn_config()).init(
        jax.random.PRNGKey(seed), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32), jnp.array([0, 1, 0]), jnp.array([1, 0, 1])
    )
    return jax.tree.map(np.asarray, variables)


def write_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """A model directory of `tiny_sevenn_config()` with random weights (PRNG `seed`); returns it."""
    return save_model(directory, tiny_sevenn_config(), tiny_variables(seed))


def write_labelled_frames(path: str | Path, n_frames: int, *, seed: int = 0, teacher_seed: int = 1,
                          n_atoms: int = 8, box: float = 6.0) -> Path:
    """Periodic Li/P/S/Ge frames as extxyz, labelled by a `tiny_sevenn_config()`
    model with random weights (PRNG `teacher_seed`): energy (eV), forces (eV/Å)
    and stress (eV/Å^3). Each frame: `n_atoms` atoms of random elements at
    random positions at least 1.6 Å apart (numpy PRNG `seed`) in a cubic cell
    of edge `box` Å. Returns `path`."""
    import ase.io
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    config = tiny_sevenn_config()
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n_frames):
        positions: list[np.ndarray] = []
        while len(positions) < n_atoms:  # rejection sampling under periodic images
            candidate = rng.uniform(0.0, box, 3)
            gaps = [candidate - p - box * np.round((candidate - p) / box) for p in positions]
            if all(np.linalg.norm(g) >= 1.6 for g in gaps):
                positions.append(candidate)
        frames.append(Frame(numbers=rng.choice(config["atomic_numbers"], n_atoms), positions=np.array(positions),
                            cell=box * np.eye(3), pbc=np.ones(3, bool), source=f"generated:{k}"))
    images = []
    for frame, label in zip(frames, Predictor(config, tiny_variables(teacher_seed)).predict(frames)):
        atoms = frame.to_atoms()
        atoms.calc = SinglePointCalculator(atoms, energy=label["energy"], forces=label["forces"],
                                           stress=label["stress"])
        images.append(atoms)
    ase.io.write(path, images, format="extxyz")
    return Path(path)


# sevenn checkpoint configs (the dict sevenn saves under "config"), for tests that
# build a checkpoint with sevenn itself and random weights (`write_sevenn_checkpoint`).
_SEVENN_SSE_SPECIES = ["Li", "P", "S", "Ge"]  # the SSE-PBE elements


def tiny_sevenn_checkpoint_config() -> dict[str, Any]:
    """A 4-channel SevenNet (sevenn's config keys) for Li, P, S, Ge: layer 0 with a
    linear self-connection, layers 1 and 2 with sevenn's "nequip" self-connection
    (a tensor product with the one-hot element attributes); parity on, so
    convolution paths reach 0e, 1o and 1e; cutoff 4 Å, l <= 1."""
    return {
        "_model_type": "E3_equivariant_model", "chemical_species": list(_SEVENN_SSE_SPECIES),
        "_number_of_species": 4, "_type_map": {3: 0, 15: 1, 16: 2, 32: 3},
        "irreps_manual": False, "channel": 4, "lmax": 1, "is_parity": True, "num_convolution_layer": 3,
        "weight_nn_hidden_neurons": [8], "self_connection_type": ["linear", "nequip", "nequip"], "cutoff": 4.0,
        "radial_basis": {"radial_basis_name": "bessel", "bessel_basis_num": 4},
        "cutoff_function": {"cutoff_function_name": "poly_cut", "poly_cut_p_value": 6},
        "act_gate": {"e": "silu", "o": "tanh"}, "act_scalar": {"e": "silu", "o": "tanh"}, "act_radial": "silu",
        "shift": [-2.0, -5.0, -4.0, -4.5], "scale": [1.0] * 4, "conv_denominator": [10.0, 12.0, 11.0],
        "train_shift_scale": False, "train_denominator": False, "use_bias_in_linear": False, "readout_as_fcn": False,
        "_normalize_sph": True, "interaction_type": "nequip", "dtype": "single",
    }


def tiny_cuni_checkpoint_config() -> dict[str, Any]:
    """The Cu/Ni cousin of `tiny_sevenn_checkpoint_config` (two layers, no parity,
    linear self-connections): a train step compiles fast."""
    return {**tiny_sevenn_checkpoint_config(), "chemical_species": ["Cu", "Ni"], "_number_of_species": 2,
            "_type_map": {29: 0, 28: 1}, "shift": [-3.5, -4.5], "scale": [1.0, 1.0], "is_parity": False,
            "num_convolution_layer": 2, "self_connection_type": "linear", "conv_denominator": [10.0, 12.0]}


def write_sevenn_checkpoint(path: str | Path, model_config: dict[str, Any], seed: int = 0) -> Path:
    """A checkpoint as sevenn writes it ({"model_state_dict", "config"}) with random
    weights drawn by torch under `seed`; needs torch and sevenn."""
    import copy

    import sevenn
    import torch
    from sevenn.checkpoint import _config_cp_routine
    from sevenn.model_build import build_E3_equivariant_model

    config = {**model_config, "version": sevenn.__version__}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # sevenn builds in float32 (nequip may have left float64 set)
    try:
        torch.manual_seed(seed)
        model = build_E3_equivariant_model(_config_cp_routine(copy.deepcopy(config)))
    finally:
        torch.set_default_dtype(previous)
    torch.save({"model_state_dict": model.state_dict(), "config": config}, path)
    return Path(path)


def subprocess_env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment of training subprocesses: they share a persistent compilation
    cache under `workdir`, so only the first one compiles the train step."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def kill_at_marker(process: subprocess.Popen, marker: Path, timeout_s: float, why: Callable[[], str]) -> None:
    """SIGKILL `process` once it has written `marker` (it then waits to be killed) and reap it.
    Fails (AssertionError) with `why()` if the process ends first, or when no marker comes within timeout_s."""
    try:
        deadline = time.time() + timeout_s
        while not marker.exists():
            assert process.poll() is None, why()
            assert time.time() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def perturb_mapped_weights(config: dict[str, Any], variables: Any, *, seed: int, n_entries: Callable[[int], int],
                           scale: float) -> tuple[Any, int]:
    """`variables` with `n_entries(size)` entries of every params leaf that maps to a torch
    tensor (config["torch_names"]) moved by normal(0, `scale`), to values a float32 checkpoint
    stores exactly (numpy PRNG `seed`); and how many entries moved."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    new = jax.tree.map(np.array, variables)
    changed = 0
    for path, (_key, start, *_rest) in config["torch_names"].items():
        if start is None or not path.startswith("params/"):
            continue
        node = new
        *parents, name = path.split("/")
        for part in parents:
            node = node[part]
        flat = node[name].reshape(-1)
        index = rng.choice(flat.size, size=n_entries(flat.size), replace=False)
        flat[index] = (flat[index] + rng.normal(0.0, scale, index.size)).astype(np.float32)
        changed += index.size
    return new, changed


def write_stand_in_run(run: str | Path, base_dir: str | Path, config: dict[str, Any], variables: Any) -> Path:
    """A run directory as `finetune` writes it, without training: run.json naming the base model
    directory `base_dir`, and model/ holding (config, variables); replaces an earlier `run`. Returns `run`."""
    import json
    import shutil

    run = Path(run)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": str(Path(base_dir).absolute()), "method": "test"}))
    save_model(run / "model", config, variables)
    return run
