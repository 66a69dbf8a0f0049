"""Flax models. Each is a pure function of its variables:

    node_energies = module.apply(variables, vectors, species, senders, receivers)

variables = {"params": trainable path weights (one leaf per e3nn instruction),
             "constants": buffers that are never trained (E0s, scale/shift,
             U matrices, normalisation constants)}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_eqv.errors import UnsupportedModelError
from sparse_eqv.models.mace import MACE
from sparse_eqv.models.magmom import HEAD_KEY, MagmomModel
from sparse_eqv.models.nequip import NequIP


def build_model(config: dict[str, Any]):
    """The model a config.json describes: the Flax module, or, when the config
    has a "magmom" entry, a `sparse_eqv.models.magmom.MagmomModel` (backbone
    + magnetic-moment head, applied the same way)."""
    if "magmom" in config:
        return MagmomModel.attach(build_backbone(config), config["magmom"], len(config["atomic_numbers"]))
    return build_backbone(config)


def build_backbone(config: dict[str, Any]) -> nn.Module:
    """The Flax energy module a converted model's config.json describes."""
    kind = config.get("model")
    if kind == "mace":
        return MACE.from_config(config)
    if kind in ("nequip", "sevenn"):
        return NequIP.from_config(config)
    raise UnsupportedModelError(f"config.json names model {kind!r}; known: mace, nequip, sevenn")


def attach_head(config: dict[str, Any], variables: Any, head: dict[str, Any], head_params: Any) -> tuple[dict, Any]:
    """A model (config, variables) with a trained magnetic-moment head added (e.g.
    one read back from an exported patch); raises if the head does not fit its layers."""
    backbone_config = {k: v for k, v in config.items() if k != "magmom"}
    MagmomModel.attach(build_backbone(backbone_config), head, len(config["atomic_numbers"]))
    dtype = jnp.float64 if config.get("dtype", "float64") == "float64" else jnp.float32
    head_params = jax.tree.map(lambda x: np.asarray(x, dtype), head_params)
    params = {**variables["params"], HEAD_KEY: head_params}
    return {**backbone_config, "magmom": head}, {**variables, "params": params}
