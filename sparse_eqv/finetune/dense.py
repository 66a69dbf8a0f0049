"""Dense baselines: `full` (every parameter trained from the base) and
`scratch` (the same, from a fresh initialisation of the architecture)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Full:
    """All params trainable ("dense"); the effective params are the tree itself.

    Attributes:
        name: "full", or "scratch" when `init` is given freshly initialised params.
    """

    name: str = "full"

    def init(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        del rng
        return {"dense": params}

    def labels(self, tree: dict[str, Any]) -> dict[str, Any]:
        return {"dense": jax.tree.map(lambda _: "dense", tree["dense"])}

    def effective(self, tree: dict[str, Any]) -> Any:
        return tree["dense"]
