"""Fine-tuning with a magnetic-moment head (`--magmom scalar|vector`).

The backbone is fine-tuned by the chosen method (STR deltas by default)
while the head (`sparse_eqv.models.magmom`) is trained densely from a fresh
initialisation: `WithMagmomHead` adds its params to the method's trainable
tree under "magmom_head", labelled "dense".

Labels: per-atom moments of the frames (`Frame.magmoms`, μB: DeePMD
`spin.npy`, extxyz `magmoms` or another per-atom key). The scalar head learns
|m| (the norm of a spin vector, |m| of a collinear moment); the vector head
needs vectors. They go into the graphs as nodes["magmoms"] ((N,) or (N, 3))
with globals["magmoms_weight"] 1 where the frame has moments, else 0.

Loss term (`sparse_eqv.finetune.losses`): w_M <(m - m_ref)^2> over the
components of the labelled atoms. Metrics: `magmom_metrics`, MAE and RMSE in
μB (per atom for |m|, per component for vectors).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jraph
import numpy as np

from sparse_eqv.data.frames import Frame
from sparse_eqv.errors import DataError, SparseEqvError
from sparse_eqv.models import build_backbone
from sparse_eqv.models.magmom import HEAD_KEY, MagmomModel, head_config


def prepare(
    model_config: dict[str, Any], params: Any, kind: str, seed: int, dtype
) -> tuple[dict, MagmomModel, Any, Any]:
    """Set a model up for training with a moment head of `kind`.

    A model that already has a head of that kind (a fine-tuned run's model)
    keeps training it; otherwise the head is freshly initialised (seeded).

    Returns:
        (config with "magmom", the MagmomModel, backbone params, head params).
    """
    backbone_config = {k: v for k, v in model_config.items() if k != "magmom"}
    backbone = build_backbone(backbone_config)
    head = model_config.get("magmom")
    params = dict(params)
    if head is not None and head["kind"] != kind:
        raise SparseEqvError(f"--magmom {kind}: the model already has a {head['kind']} moment head")
    head_params = params.pop(HEAD_KEY, None)
    if head is None:
        head = head_config(backbone.feature_irreps(), kind)
    model = MagmomModel.attach(backbone, head, len(model_config["atomic_numbers"]))
    if head_params is None:
        head_params = jax.tree.map(np.asarray, model.init_head(jax.random.PRNGKey(seed), dtype))
    return {**backbone_config, "magmom": head}, model, params, head_params


def target(frame: Frame, kind: str) -> np.ndarray:
    """The frame's moment labels for a head of `kind`: (N,) |m| or (N, 3) m, μB."""
    moments = np.asarray(frame.magmoms, dtype=np.float64)
    if kind == "scalar":
        return np.linalg.norm(moments, axis=-1) if moments.ndim == 2 else np.abs(moments)
    if moments.ndim != 2:
        raise DataError(
            f"{frame.source}: --magmom vector needs per-atom moment vectors (N, 3); this frame has collinear "
            f"moments of shape {moments.shape} (use --magmom scalar)"
        )
    return moments


def label_graphs(graphs: Sequence[jraph.GraphsTuple], frames: Sequence[Frame], kind: str) -> list[jraph.GraphsTuple]:
    """The graphs with moment labels: nodes["magmoms"], globals["magmoms_weight"]."""
    shape = (3,) if kind == "vector" else ()
    out = []
    for graph, frame in zip(graphs, frames):
        labelled = frame.magmoms is not None
        moments = target(frame, kind) if labelled else np.zeros((frame.num_atoms, *shape))
        out.append(graph._replace(
            nodes={**graph.nodes, "magmoms": moments},
            globals={**graph.globals, "magmoms_weight": np.array([1.0 if labelled else 0.0])},
        ))
    return out


def require_labels(frames: Sequence[Frame], path: Any) -> None:
    """DataError unless some frame of the training set carries moments."""
    if not any(f.magmoms is not None for f in frames):
        raise DataError(
            f"{path}: --magmom needs per-atom magnetic moments, and no frame has them (DeePMD: set.*/spin.npy; "
            "extxyz: a per-atom array named by --magmoms-key)"
        )


class WithMagmomHead:
    """A fine-tuning method (STR, ELoRA, Full) plus a densely trained head.

    tree = {**method tree, "magmom_head": head params}; the head's leaves are
    labelled "dense" and passed to the model as params["magmom_head"]. Any
    other attribute (thresholded_delta, thresholds, targets, name, ...) is
    the wrapped method's.
    """

    def __init__(self, method, head_params: Any):
        self.method = method
        self.head_params = head_params

    def __getattr__(self, name: str):
        if name in ("method", "head_params"):  # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.method, name)

    @staticmethod
    def _split(tree: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        return {k: v for k, v in tree.items() if k != HEAD_KEY}, tree[HEAD_KEY]

    def init(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        return {**self.method.init(params, rng), HEAD_KEY: self.head_params}

    def labels(self, tree: dict[str, Any]) -> dict[str, Any]:
        inner, head = self._split(tree)
        return {**self.method.labels(inner), HEAD_KEY: jax.tree.map(lambda _: "dense", head)}

    def effective(self, tree: dict[str, Any]) -> Any:
        inner, head = self._split(tree)
        return {**self.method.effective(inner), HEAD_KEY: head}


def magmom_metrics(frames: Sequence[Frame], predictions: Sequence[dict[str, np.ndarray]]) -> dict[str, float | None]:
    """magmoms_mae / magmoms_rmse in μB over the frames that carry moments.

    The prediction's shape says the kind: (N,) |m| is compared with the
    label's norm, (N, 3) component by component.
    """
    errors = []
    for frame, pred in zip(frames, predictions):
        if frame.magmoms is None or "magmoms" not in pred:
            continue
        kind = "vector" if np.ndim(pred["magmoms"]) == 2 else "scalar"
        errors.append(np.ravel(np.asarray(pred["magmoms"]) - target(frame, kind)))
    if not errors:
        return {"magmoms_mae": None, "magmoms_rmse": None}
    e = np.concatenate(errors)
    return {"magmoms_mae": float(np.mean(np.abs(e))), "magmoms_rmse": float(np.sqrt(np.mean(e**2)))}
