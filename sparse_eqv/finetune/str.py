"""STR: sparse weight deltas through a learnable soft threshold.

Effective parameters of a fine-tuned model, leaf by leaf:

    W_eff = W + S(dW, sigmoid(s))      for targeted leaves
    W_eff = W                          for every other leaf
    S(x, d) = sign(x) * relu(|x| - d)

W is the frozen base, dW a trainable delta of W's shape, and s a scalar
score shared by all leaves of one layer (a Flax module, the default) or
owned by one leaf (one e3nn path, `per_path=True`). Decoupled weight decay on
s pulls it toward 0, i.e. the threshold toward 1/2: that is the sparsity
pressure (Kusupati et al. 2020).

The trainable tree is {"base": params, "delta": ..., "score": ...}: base is
labelled "frozen" (never updated, no optimiser state), deltas mirror the
targeted leaves of params, scores are scalars keyed by their group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparse_eqv.finetune.targets import Key

# The key a layer's shared score sits under, next to the layer's own path.
LAYER_SCORE = "threshold_score"

# The default recipe (docs/results.md, "Choosing the default recipe"): the scores learn at SCORE_LR, so
# the thresholds reach their level within the first few hundred steps, and the deltas at DELTA_LR, fast
# enough that the deltas worth keeping outgrow the rising thresholds instead of being cut off with the
# rest. At the optimiser's lr (1e-3) for both, thresholds barely rise in a few hundred steps; with the
# scores at 0.05 and the deltas at 1e-3 (or 3e-3) they rise faster than the deltas can follow.
SCORE_LR = 0.05
DELTA_LR = 1e-2


def soft_threshold(x: jax.Array, threshold: jax.Array) -> jax.Array:
    """S(x, d) = sign(x) * relu(|x| - d): exact zeros where |x| <= d."""
    return jnp.sign(x) * jax.nn.relu(jnp.abs(x) - threshold)


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


@dataclasses.dataclass(frozen=True)
class STR:
    """Soft-threshold reparametrisation of the targeted leaves.

    Attributes:
        targets: flattened-params keys (tuples of names) that get a delta.
        per_path: one score per leaf instead of one per layer.
        delta_std: standard deviation of the initial delta (paper: 0.01).
        init_threshold: sigmoid(s) at the start (paper: 1e-3).
    """

    targets: tuple[Key, ...]
    per_path: bool = False
    delta_std: float = 0.01
    init_threshold: float = 1e-3

    name = "str"

    def group(self, key: Key) -> Key:
        """The score key of a targeted leaf."""
        return key if self.per_path else key[:-1] + (LAYER_SCORE,)

    def init(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        flat = traverse_util.flatten_dict(params)
        keys = jax.random.split(rng, len(self.targets))
        delta, score = {}, {}
        for k, key in zip(keys, self.targets):
            leaf = jnp.asarray(flat[key])
            delta[key] = self.delta_std * jax.random.normal(k, leaf.shape, leaf.dtype)
            score[self.group(key)] = jnp.asarray(_logit(self.init_threshold), leaf.dtype)
        return {
            "base": params,
            "delta": traverse_util.unflatten_dict(delta),
            "score": traverse_util.unflatten_dict(score),
        }

    def labels(self, tree: dict[str, Any]) -> dict[str, Any]:
        return {
            "base": jax.tree.map(lambda _: "frozen", tree["base"]),
            "delta": jax.tree.map(lambda _: "delta", tree["delta"]),
            "score": jax.tree.map(lambda _: "score", tree["score"]),
        }

    def thresholded_delta(self, tree: dict[str, Any]) -> dict[Key, jax.Array]:
        """S(dW, sigmoid(s)) per targeted leaf, keyed by flattened key."""
        delta = traverse_util.flatten_dict(tree["delta"])
        score = traverse_util.flatten_dict(tree["score"])
        return {key: soft_threshold(d, jax.nn.sigmoid(score[self.group(key)])) for key, d in delta.items()}

    def effective(self, tree: dict[str, Any]) -> Any:
        """Params the model runs with: base + thresholded delta (base gets no gradient)."""
        flat = traverse_util.flatten_dict(jax.lax.stop_gradient(tree["base"]))
        for key, d in self.thresholded_delta(tree).items():
            flat[key] = flat[key] + d
        return traverse_util.unflatten_dict(flat)

    def thresholds(self, tree: dict[str, Any]) -> dict[Key, float]:
        """sigmoid(s) per score group, as floats (for logs and reports)."""
        return {key: float(jax.nn.sigmoid(s)) for key, s in traverse_util.flatten_dict(tree["score"]).items()}
