"""Reference predictions of mace-torch 0.3.16 for the MACE parity tests.

Run with the MACE environment (`.venv-mace/bin/python`, e3nn 0.4.4) and
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`:

    mace_reference.py ARCH --seed S --model OUT.model [--frames F.extxyz --out OUT.npz]
                      [--head NAME] [--full-size]
    mace_reference.py --jobs JOBS.json     (a list of {"arch", "seed", "model",
                                            "frames", "out", "head", "full_size"})

Builds the named architecture with random weights (seeded), `torch.save`s the
whole module as a `.model` file (what mace writes), loads that file back as
mace's calculator does, and evaluates energy (eV), forces (eV/Å) and stress
(eV/Å^3, ASE sign) of every frame of F.extxyz in float64, all frames in one
batch. Writes energy (G,), forces (sum N, 3), stress (G, 3, 3), n_atoms (G,).
Within one run, mace's U matrices (a pure function of the irreps) are computed
once per distinct argument set: the models are the same, only built faster.

Architectures follow the published foundation models (hyperparameters from the
mace training logs / model cards); channel counts and the radial MLP are
reduced unless --full-size, which keeps every block type and option.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from mace import data as mace_data  # noqa: E402
from mace import modules  # noqa: E402
from mace.modules import symmetric_contraction  # noqa: E402
from mace.tools import torch_geometric, utils  # noqa: E402

MATERIALS = [1, 3, 8, 15, 16, 29, 32]  # H Li O P S Cu Ge: the SSE-PBE and Cu frames, plus unused H, O
ORGANICS = [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]  # MACE-OFF23's ten elements

# name: (full-size hyperparameters, reduced overrides). Residual first blocks
# are what mace's `--interaction_first` default gives; MACE-MP-0 and OFF23 were
# trained by mace versions that hard-wired RealAgnosticInteractionBlock first.
ARCHITECTURES = {
    "mp0-medium": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
        interaction_first="RealAgnosticInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
        num_interactions=2, channels=128, max_L=1, MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64],
    ),
    "mp0b3-medium": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
        interaction_first="RealAgnosticDensityInteractionBlock",
        interaction="RealAgnosticDensityResidualInteractionBlock", num_interactions=2, channels=128, max_L=1,
        MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64], pair_repulsion=True, distance_transform="Agnesi",
    ),
    "mpa0-medium": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
        interaction_first="RealAgnosticResidualInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
        num_interactions=2, channels=128, max_L=2, MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64],
        pair_repulsion=True, distance_transform="Agnesi",
    ),
    "off23-small": dict(
        model="ScaleShiftMACE", elements=ORGANICS, r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_first="RealAgnosticInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
        num_interactions=2, channels=96, max_L=0, MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64],
    ),
    "off23-medium": dict(
        model="ScaleShiftMACE", elements=ORGANICS, r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_first="RealAgnosticInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
        num_interactions=2, channels=128, max_L=1, MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64],
    ),
    # Plain MACE (no scale/shift), correlation 1, three layers, cutoff applied to the
    # radial MLP output (apply_cutoff=False).
    "corr1": dict(
        model="MACE", elements=ORGANICS, r_max=5.0, num_bessel=6, num_polynomial_cutoff=6, max_ell=2,
        interaction_first="RealAgnosticResidualInteractionBlock", interaction="RealAgnosticInteractionBlock",
        num_interactions=3, channels=32, max_L=1, MLP_irreps="8x0e", correlation=1, radial_MLP=[32, 32],
        apply_cutoff=False,
    ),
    # Correlation 2 then 1, max_ell 2, hidden L=2 kept up to the last layer, only the
    # last layer read out.
    "corr2": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
        interaction_first="RealAgnosticDensityResidualInteractionBlock",
        interaction="RealAgnosticDensityInteractionBlock", num_interactions=2, channels=32, max_L=2,
        MLP_irreps="16x0e", correlation=[2, 1], radial_MLP=[32, 32, 32], pair_repulsion=True,
        keep_last_layer_irreps=True, use_last_readout_only=True,
    ),
    # Multi-head fine-tuned model (mace's pt_head + a new head), per-head E0s, scale and shift.
    "multihead": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
        interaction_first="RealAgnosticResidualInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
        num_interactions=2, channels=128, max_L=1, MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64],
        heads=["pt_head", "DFT"],
    ),
    # Outside what the converter reproduces: an attention interaction block.
    "unsupported-att": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
        interaction_first="RealAgnosticResidualInteractionBlock",
        interaction="RealAgnosticAttResidualInteractionBlock", num_interactions=2, channels=128, max_L=1,
        MLP_irreps="16x0e", correlation=2, radial_MLP=[64, 64, 64],
    ),
    # Outside what the converter reproduces: a Gaussian radial basis.
    "unsupported-radial": dict(
        model="ScaleShiftMACE", elements=MATERIALS, r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=1,
        interaction_first="RealAgnosticResidualInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
        num_interactions=2, channels=8, max_L=0, MLP_irreps="16x0e", correlation=2, radial_MLP=[16],
        radial_type="gaussian",
    ),
}
REDUCED = dict(channels=16, radial_MLP=[16, 16, 16])


def _memoize_u_matrices() -> None:
    """Compute each of mace's U matrices once per process (clones returned: buffers stay separate)."""
    compute = symmetric_contraction.U_matrix_real

    @functools.lru_cache(maxsize=None)
    def cached(irreps_in: str, irreps_out: str, correlation: int, use_cueq_cg, dtype):
        return compute(
            irreps_in=irreps_in, irreps_out=irreps_out, correlation=correlation, use_cueq_cg=use_cueq_cg, dtype=dtype
        )

    def u_matrix_real(irreps_in, irreps_out, correlation, use_cueq_cg=None, dtype=None):
        result = cached(str(irreps_in), str(irreps_out), correlation, use_cueq_cg, dtype)
        return [value.clone() if torch.is_tensor(value) else value for value in result]

    symmetric_contraction.U_matrix_real = u_matrix_real


def build(arch: str, seed: int, full_size: bool) -> torch.nn.Module:
    """The architecture with mace's own random initialisation (seeded), float64."""
    spec = dict(ARCHITECTURES[arch])
    if not full_size and not arch.startswith("unsupported"):
        spec.update({k: v for k, v in REDUCED.items() if k in spec})
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64)
    heads = spec.get("heads", ["Default"])
    n_heads, n_elements = len(heads), len(spec["elements"])
    e0s = rng.uniform(-5.0, -1.0, size=(n_heads, n_elements))
    channels, max_L = spec["channels"], spec["max_L"]
    hidden = o3.Irreps("+".join(f"{channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(max_L + 1)))
    kwargs = dict(
        r_max=spec["r_max"],
        num_bessel=spec["num_bessel"],
        num_polynomial_cutoff=spec["num_polynomial_cutoff"],
        max_ell=spec["max_ell"],
        interaction_cls=modules.interaction_classes[spec["interaction"]],
        interaction_cls_first=modules.interaction_classes[spec["interaction_first"]],
        num_interactions=spec["num_interactions"],
        num_elements=n_elements,
        hidden_irreps=hidden,
        MLP_irreps=o3.Irreps(spec["MLP_irreps"]),
        atomic_energies=e0s if n_heads > 1 else e0s[0],
        avg_num_neighbors=float(rng.uniform(8.0, 40.0)),
        atomic_numbers=spec["elements"],
        correlation=spec["correlation"],
        gate=torch.nn.functional.silu,
        pair_repulsion=spec.get("pair_repulsion", False),
        distance_transform=spec.get("distance_transform", "None"),
        radial_MLP=spec["radial_MLP"],
        heads=heads,
        apply_cutoff=spec.get("apply_cutoff", True),
        use_last_readout_only=spec.get("use_last_readout_only", False),
        keep_last_layer_irreps=spec.get("keep_last_layer_irreps", False),
        radial_type=spec.get("radial_type", "bessel"),
    )
    if spec["model"] == "ScaleShiftMACE":
        scale = rng.uniform(0.5, 2.0, size=n_heads)
        shift = rng.uniform(-0.5, 0.5, size=n_heads)
        model = modules.ScaleShiftMACE(
            atomic_inter_scale=scale.tolist() if n_heads > 1 else float(scale[0]),
            atomic_inter_shift=shift.tolist() if n_heads > 1 else float(shift[0]),
            **kwargs,
        )
    else:
        model = modules.MACE(**kwargs)
    return model.double()


def evaluate(model: torch.nn.Module, frames_path: str, head: str | None) -> dict[str, np.ndarray]:
    """Energy, forces, stress of every frame in one batch, as mace's calculator computes them."""
    atoms_list = ase.io.read(frames_path, index=":")
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    heads = list(getattr(model, "heads", ["Default"]))
    head = head or heads[0]
    r_max = float(model.r_max)
    graphs = [
        mace_data.AtomicData.from_config(
            mace_data.config_from_atoms(atoms, key_specification=mace_data.KeySpecification(), head_name=head),
            z_table=z_table,
            cutoff=r_max,
            heads=heads,
        )
        for atoms in atoms_list
    ]
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False, drop_last=False)
    batch = next(iter(loader))
    out = model(batch.to_dict(), compute_stress=True, training=False)
    return {
        "energy": out["energy"].detach().numpy(),
        "forces": out["forces"].detach().numpy(),
        "stress": out["stress"].detach().numpy(),
        "n_atoms": np.array([len(a) for a in atoms_list]),
    }


def run(arch: str, seed: int, model: str, frames: str | None = None, out: str | None = None,
        head: str | None = None, full_size: bool = False) -> None:
    """Build, save, reload and (with frames) evaluate one model."""
    torch.save(build(arch, seed, full_size), model)
    if frames:
        loaded = torch.load(model, map_location="cpu", weights_only=False).double()
        np.savez(out, **evaluate(loaded, frames, head))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", nargs="?", choices=sorted(ARCHITECTURES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="where to torch.save the model")
    parser.add_argument("--frames", help="extxyz file of the frames to evaluate")
    parser.add_argument("--out", help="npz of the predictions")
    parser.add_argument("--head", help="head to evaluate (default: the first)")
    parser.add_argument("--full-size", action="store_true", help="foundation-size channels and radial MLP")
    parser.add_argument("--jobs", help="JSON list of jobs (keyword arguments of `run`)")
    args = parser.parse_args()
    _memoize_u_matrices()
    if args.jobs:
        with open(args.jobs) as handle:
            for job in json.load(handle):
                run(**job)
    elif args.arch and args.model:
        run(args.arch, args.seed, args.model, args.frames, args.out, args.head, args.full_size)
    else:
        parser.error("give ARCH and --model, or --jobs")


if __name__ == "__main__":
    main()
