"""ELoRA baseline: a low-rank delta on every targeted e3nn path weight.

For a path weight W viewed as a matrix (mul_in, mul_out) (leading axes of a
tensor-product weight folded into mul_in; radial-MLP matrices as they are):

    W_eff = W + (alpha / r) * A @ B,   A (mul_in, r), B (r, mul_out)

A starts uniform in +-1/sqrt(mul_in) (as PEFT's LoRA), B at zero, so the
fine-tuned model starts as the base. Leaves with fewer than two axes
(biases, scalars) have no low-rank form and stay frozen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from sparse_eqv.finetune.targets import Key


@dataclasses.dataclass(frozen=True)
class ELoRA:
    """Per-path low-rank adaptation.

    Attributes:
        targets: flattened-params keys to adapt (leaves with ndim < 2 are skipped).
        rank: r.
        alpha: scale numerator; the product is scaled by alpha / r.
    """

    targets: tuple[Key, ...]
    rank: int = 16
    alpha: float = 16.0

    name = "elora"

    def adapted(self, params: Any) -> tuple[Key, ...]:
        flat = traverse_util.flatten_dict(params)
        return tuple(key for key in self.targets if jnp.ndim(flat[key]) >= 2)

    def init(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        flat = traverse_util.flatten_dict(params)
        keys = self.adapted(params)
        lora = {}
        for k, key in zip(jax.random.split(rng, max(len(keys), 1)), keys):
            leaf = jnp.asarray(flat[key])
            mul_out = leaf.shape[-1]
            mul_in = leaf.size // mul_out
            bound = 1.0 / math.sqrt(mul_in)
            lora[key + ("A",)] = jax.random.uniform(k, (mul_in, self.rank), leaf.dtype, -bound, bound)
            lora[key + ("B",)] = jnp.zeros((self.rank, mul_out), leaf.dtype)
        return {"base": params, "lora": traverse_util.unflatten_dict(lora)}

    def labels(self, tree: dict[str, Any]) -> dict[str, Any]:
        return {
            "base": jax.tree.map(lambda _: "frozen", tree["base"]),
            "lora": jax.tree.map(lambda _: "delta", tree["lora"]),
        }

    def deltas(self, tree: dict[str, Any]) -> dict[Key, jax.Array]:
        """(alpha / r) A @ B per adapted leaf, in the leaf's shape."""
        flat = traverse_util.flatten_dict(tree["base"])
        lora = traverse_util.flatten_dict(tree["lora"])
        scale = self.alpha / self.rank
        out = {}
        for key in self.adapted(tree["base"]):
            out[key] = (scale * lora[key + ("A",)] @ lora[key + ("B",)]).reshape(jnp.shape(flat[key]))
        return out

    def effective(self, tree: dict[str, Any]) -> Any:
        flat = traverse_util.flatten_dict(jax.lax.stop_gradient(tree["base"]))
        for key, d in self.deltas(tree).items():
            flat[key] = flat[key] + d
        return traverse_util.unflatten_dict(flat)
