"""Build a small random-weight MACE model and write the reference for the pickle reader.

Run with the MACE environment (``.venv-mace/bin/python``, e3nn 0.4.4) and
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``::

    pickle_mace_model.py OUT.model OUT.npz

``OUT.model`` is ``torch.save(model)`` of a 2-element ``ScaleShiftMACE``
(8x0e+8x1o hidden, max_ell 2, correlation 2, 2 residual interactions) with
random weights. ``OUT.npz`` holds every ``model.state_dict()`` entry under its
key, plus, under ``w3j/<module path>.<buffer>``, each ``_w3j_*`` buffer of the
e3nn code-generated tensor-product submodules, and under ``keys_after_load``
the state-dict keys, in order, of the model as ``torch.load`` gives it back
(e3nn re-registers the code-generated submodules last when it unpickles them).
"""

import sys

import numpy as np
import torch
from e3nn import o3
from mace import modules


def build_model() -> torch.nn.Module:
    """A small ScaleShiftMACE in float64 with every float weight drawn at random."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    model = modules.ScaleShiftMACE(
        r_max=4.5,
        num_bessel=6,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2,
        num_elements=2,
        hidden_irreps=o3.Irreps("8x0e+8x1o"),
        MLP_irreps=o3.Irreps("4x0e"),
        atomic_energies=np.array([-1.5, -2.25]),
        avg_num_neighbors=7.0,
        atomic_numbers=[1, 8],
        correlation=2,
        gate=torch.nn.functional.silu,
        atomic_inter_scale=1.25,
        atomic_inter_shift=0.5,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def w3j_buffers(model: torch.nn.Module) -> dict:
    """``_w3j_*`` buffers of the code-generated submodules, keyed by their qualified name."""
    out = {}
    for name, module in model.named_modules():
        for fname in getattr(module, "__codegen__", []):
            for bname, buf in getattr(module, fname).named_buffers():
                if bname.startswith("_w3j"):
                    out[f"{name}.{fname}.{bname}"] = buf.detach().numpy()
    return out


def main(model_path: str, npz_path: str) -> None:
    model = build_model()
    torch.save(model, model_path)
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w3j = w3j_buffers(model)
    if not w3j:
        raise RuntimeError("no code-generated _w3j buffers found")
    ref.update({f"w3j/{k}": v for k, v in w3j.items()})
    ref["keys_after_load"] = np.array(list(torch.load(model_path, weights_only=False).state_dict()))
    np.savez(npz_path, **ref)


if __name__ == "__main__":
    main(*sys.argv[1:])
