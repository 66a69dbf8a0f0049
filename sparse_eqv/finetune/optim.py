"""One optax transformation over a labelled trainable tree.

Labels: "frozen" (set_to_zero: no update, no optimiser state), "delta"
(AdamW, no weight decay), "score" (AdamW with the threshold decay
lambda_tau: decoupled decay pulls STR scores toward 0, raising the
threshold), "dense" (AdamW with its own weight decay).

The learning rate given here is the peak; schedules (cosine, plateau) scale
the updates by a factor the training step receives (see `scale_updates`), so
the schedule state stays outside the optimiser and is checkpointed with it.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

LABELS = ("frozen", "delta", "score", "dense")


def make_optimizer(
    labels: Any,
    *,
    lr: float,
    threshold_decay: float = 0.0,
    score_lr: float | None = None,
    dense_weight_decay: float = 0.0,
    clip_norm: float | None = None,
    dense_lr: float | None = None,
) -> optax.GradientTransformation:
    """optax.partition over `labels` (a tree of label strings).

    Args:
        labels: same structure as the trainable tree, each leaf one of LABELS.
        lr: learning rate of deltas and dense leaves.
        threshold_decay: lambda_tau, AdamW weight decay on scores.
        score_lr: learning rate of scores (default: lr).
        dense_weight_decay: AdamW weight decay on dense leaves.
        clip_norm: clip the global gradient norm first (None: no clipping).
        dense_lr: learning rate of dense leaves (default: lr), e.g. a freshly
            initialised head trained beside STR deltas.
    """
    present = set(jax.tree.leaves(labels))
    unknown = present - set(LABELS)
    if unknown:
        raise ValueError(f"unknown parameter labels {sorted(unknown)}; known: {LABELS}")
    transforms = {
        "frozen": optax.set_to_zero(),
        "delta": optax.adamw(lr, weight_decay=0.0),
        "score": optax.adamw(lr if score_lr is None else score_lr, weight_decay=threshold_decay),
        "dense": optax.adamw(lr if dense_lr is None else dense_lr, weight_decay=dense_weight_decay),
    }
    transform = optax.partition({k: v for k, v in transforms.items() if k in present}, labels)
    if clip_norm is not None:
        transform = optax.chain(optax.clip_by_global_norm(clip_norm), transform)
    return transform


def scale_updates(updates: Any, factor: jax.Array) -> Any:
    """Multiply every update by the schedule's factor (lr and decay alike)."""
    return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)


def state_size(opt_state: Any) -> int:
    """Number of array entries held by an optimiser state (memory check)."""
    return sum(int(getattr(x, "size", 1)) for x in jax.tree.leaves(opt_state))
