"""nequip 0.19.1 checkpoints with random weights, and their official predictions.

`write_checkpoint` builds a `NequIPLightningModule` around a model config
(as `nequip-train` does) and saves what Lightning saves for loading
(`state_dict`, `hyper_parameters`, version): the file then loads with
nequip's own `ModelFromCheckpoint`. Every float parameter and the per-type
scales/shifts are drawn at random so nothing is left at a special value.
`predict` evaluates through nequip's ASE calculator
(`NequIPCalculator._from_saved_model`, eager), the way users run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def emt_data_config(element: str, r_max: float) -> dict:
    """A resolved `data` section (nequip's EMT test dataset) so `nequip-package` can build from the file."""
    return {
        "_target_": "nequip.data.datamodule.NequIPDataModule",
        "seed": 1,
        "split_dataset": {
            "dataset": {
                "_target_": "nequip.data.dataset.EMTTestDataset",
                "transforms": [
                    {"_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                     "model_type_names": [element], "chemical_species_to_atom_type_map": {element: element}},
                    {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": r_max},
                ],
                "supercell": [2, 2, 2], "seed": 1, "num_frames": 4, "element": element,
            },
            "train": 2, "val": 2,
        },
        "train_dataloader": {"_target_": "torch.utils.data.DataLoader", "batch_size": 1},
        "val_dataloader": {"_target_": "torch.utils.data.DataLoader", "batch_size": 1},
        "stats_manager": {"_target_": "nequip.data.CommonDataStatisticsManager", "type_names": [element]},
    }


def write_checkpoint(path: Path, model_config: dict, seed: int = 0, ema: bool = False, data: dict | None = None) -> Path:
    """Save a checkpoint of `model_config` with random weights.

    ema=True saves an `EMALightningModule` (nequip-train's usual choice): its
    EMA copy keeps the builder's initial weights while the raw parameters are
    re-drawn, so a converter that ignores the EMA weights gets other numbers.
    """
    import lightning
    import torch
    from nequip.train import EMALightningModule, NequIPLightningModule
    from nequip.utils import get_current_code_versions
    from nequip.utils.global_state import set_global_state

    set_global_state()
    info = {
        "versions": get_current_code_versions(verbose=False),
        "training_module": {"_target_": f"nequip.train.{'EMALightningModule' if ema else 'NequIPLightningModule'}"},
    }
    if data is not None:
        info["data"] = data
    module = (EMALightningModule if ema else NequIPLightningModule)(
        model=model_config, num_datasets={"train": 1, "val": 0, "test": 0, "predict": 0}, info_dict=info
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.5 if "embed" not in name else 1.0))
        for name, b in module.model.named_buffers():
            if name.endswith("scales"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("shifts"):
                b.copy_(-3.0 * torch.rand(b.shape, generator=gen, dtype=b.dtype))
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    return path


def predict(model_path: str, atoms_list) -> list[dict]:
    """energy (eV), forces (N, 3) eV/Å, stress (3, 3) eV/Å^3 (ASE sign) per ase.Atoms."""
    from ase.stress import voigt_6_to_full_3x3_stress
    from nequip.integrations.ase import NequIPCalculator

    calc = NequIPCalculator._from_saved_model(model_path, device="cpu")
    out = []
    for atoms in atoms_list:
        atoms = atoms.copy()
        atoms.calc = calc
        result = {"energy": float(atoms.get_potential_energy()), "forces": np.array(atoms.get_forces(), dtype=np.float64)}
        result["stress"] = (
            voigt_6_to_full_3x3_stress(np.asarray(atoms.get_stress(), dtype=np.float64))
            if atoms.pbc.any() else None
        )
        out.append(result)
    return out
