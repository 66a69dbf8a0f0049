"""SevenNet predictions from the official package (sevenn 0.13), for parity tests.

float32: `sevenn.calculator.SevenNetCalculator` as users run it.
float64: the same model (`SevenNetCheckpoint.build_model`, which applies
sevenn's own old-checkpoint patches) moved to float64; sevenn builds some
inputs with `.float()` (the one-hot node embedding), so a forward pre-hook on
every module casts the floating tensors it receives to float64. The graph is
sevenn's own (`unlabeled_atoms_to_graph`), kept in float64.
"""

from __future__ import annotations

import numpy as np


def _as_results(energy, forces, stress_voigt) -> dict:
    from ase.stress import voigt_6_to_full_3x3_stress

    return {
        "energy": float(energy),
        "forces": np.asarray(forces, dtype=np.float64),
        "stress": voigt_6_to_full_3x3_stress(np.asarray(stress_voigt, dtype=np.float64)),
    }


def _cast_hook(module, args):
    import torch

    data = args[0]
    if hasattr(data, "keys"):
        for key in list(data.keys()):
            value = data[key]
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                data[key] = value.double()
    return None


def predict(checkpoint: str, atoms_list, dtype: str = "float64", modal: str | None = None) -> list[dict]:
    """energy (eV), forces (N, 3) eV/Å, stress (3, 3) eV/Å^3 (ASE sign) per ase.Atoms.

    modal: the fidelity of a multi-fidelity checkpoint (e.g. "PBE"). sevenn
    builds its model in torch's default dtype, which nequip (in the same test
    process) switches to float64 for good: build under float32, as sevenn expects.
    """
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return _predict(checkpoint, atoms_list, dtype, modal)
    finally:
        torch.set_default_dtype(previous)


def _predict(checkpoint: str, atoms_list, dtype: str, modal: str | None) -> list[dict]:
    import torch

    if dtype == "float32":
        from sevenn.calculator import SevenNetCalculator

        calc = SevenNetCalculator(model=checkpoint, device="cpu", modal=modal)
        out = []
        for atoms in atoms_list:
            atoms = atoms.copy()
            atoms.calc = calc
            out.append(_as_results(atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
        return out

    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.checkpoint import SevenNetCheckpoint
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    cp = SevenNetCheckpoint(checkpoint)
    model = cp.build_model()
    model.set_is_batch_data(False)
    model.to(torch.float64)
    model.eval()
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):  # e3nn may script its codegen (process-wide setting)
            module.register_forward_pre_hook(_cast_hook)
    cutoff = cp.config[KEY.CUTOFF]
    out = []
    for atoms in atoms_list:
        graph = unlabeled_atoms_to_graph(atoms, cutoff)
        tensors = {}
        for key, value in graph.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
                value = value.double() if value.dtype.is_floating_point else value.long()
            tensors[key] = value
        data = AtomGraphData(**tensors)
        if modal is not None:
            data[KEY.DATA_MODALITY] = modal
        result = model(data)
        n = len(atoms)
        stress = -result[KEY.PRED_STRESS].detach().numpy()[[0, 1, 2, 4, 5, 3]]
        out.append(_as_results(
            result[KEY.PRED_TOTAL_ENERGY].detach().item(), result[KEY.PRED_FORCE].detach().numpy()[:n], stress
        ))
    return out
