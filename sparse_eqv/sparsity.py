"""Sparsity of fine-tuned deltas: counts and views, prune and merge.

Definitions (the paper's):
    layer sparsity  zeros among all targeted delta entries (STR's
                    thresholded delta), over every targeted layer together
    total sparsity  fraction of all model parameters left unchanged by
                    fine-tuning, frozen ones included: entries with
                    effective == base

A delta is a flat dict {flattened params key: array of the leaf's shape};
views are keyed by the leaf path "params/a/b/w[0,1] ...".
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sparse_eqv.finetune.targets import Key, leaf_path


def prune(method, tree: dict[str, Any]) -> dict[Key, np.ndarray]:
    """The STR delta as it acts: S(dW, sigmoid(s)) per targeted leaf, fixed
    (exact zeros kept), as numpy arrays."""
    return {key: np.asarray(d) for key, d in method.thresholded_delta(tree).items()}


def merge(base_params: Any, delta: dict[Key, Any]) -> Any:
    """Fold a delta into the base: the params a plain model runs with.

    The sum is computed as in `STR.effective`, so the merged model predicts
    what the training-time effective params predicted.
    """
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(base_params).items()}
    for key, d in delta.items():
        flat[key] = flat[key] + np.asarray(d)
    return traverse_util.unflatten_dict(flat)


def changed_entries(base_params: Any, params: Any) -> dict[Key, np.ndarray]:
    """Per leaf, the boolean mask of entries that differ from the base."""
    base = traverse_util.flatten_dict(base_params)
    new = traverse_util.flatten_dict(params)
    return {key: np.asarray(new[key]) != np.asarray(base[key]) for key in base}


def layer_sparsity(delta: dict[Key, Any]) -> float:
    """Zeros over all targeted delta entries."""
    sizes = sum(np.size(d) for d in delta.values())
    zeros = sum(int(np.sum(np.asarray(d) == 0)) for d in delta.values())
    return zeros / sizes if sizes else 0.0


def total_sparsity(base_params: Any, params: Any) -> float:
    """Fraction of all parameters whose fine-tuned value equals the base's."""
    masks = changed_entries(base_params, params).values()
    total = sum(m.size for m in masks)
    return 1.0 - sum(int(m.sum()) for m in masks) / total if total else 0.0


def path_view(delta: dict[Key, Any]) -> dict[str, dict[str, float]]:
    """Per targeted leaf (one e3nn path): size, non-zeros and sparsity."""
    out = {}
    for key, d in delta.items():
        d = np.asarray(d)
        nonzero = int(np.count_nonzero(d))
        out[leaf_path(key)] = {"size": int(d.size), "nonzero": nonzero, "sparsity": 1.0 - nonzero / max(d.size, 1)}
    return out


def layer_view(delta: dict[Key, Any]) -> dict[str, dict[str, float]]:
    """Per layer (the leaf's parent module): size, non-zeros and sparsity."""
    out: dict[str, dict[str, float]] = {}
    for key, d in delta.items():
        layer = leaf_path(key[:-1])
        entry = out.setdefault(layer, {"size": 0, "nonzero": 0})
        entry["size"] += int(np.size(d))
        entry["nonzero"] += int(np.count_nonzero(np.asarray(d)))
    for entry in out.values():
        entry["sparsity"] = 1.0 - entry["nonzero"] / max(entry["size"], 1)
    return out


def summary(base_params: Any, params: Any, delta: dict[Key, Any] | None) -> dict[str, Any]:
    """Numbers for metrics.json: total and (STR) layer sparsity, parameter counts."""
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(base_params))
    out: dict[str, Any] = {"n_params": n_params, "total_sparsity": total_sparsity(base_params, params)}
    if delta is not None:
        out["layer_sparsity"] = layer_sparsity(delta)
        out["n_targeted"] = sum(int(np.size(d)) for d in delta.values())
        out["n_delta_nonzero"] = sum(int(np.count_nonzero(np.asarray(d))) for d in delta.values())
    return out
