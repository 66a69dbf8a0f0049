"""Flax models. Each is a pure function of its variables:

    node_energies = module.apply(variables, vectors, species, senders, receivers)

variables = {"params": trainable path weights (one leaf per e3nn instruction),
             "constants": buffers that are never trained (E0s, scale/shift,
             U matrices, normalisation constants)}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from sparse_eqv.errors import UnsupportedModelError


def build_model(config: dict[str, Any]):
    """The model a config.json describes: the Flax module, or, when the config
    has a "magmom" entry, a `sparse_eqv.models.magmom.MagmomModel` (backbone
    + magnetic-moment head, applied the same way)."""
    if "magmom" in config:
        from sparse_eqv.models.magmom import MagmomModel

        return MagmomModel.from_config(config)
    return build_backbone(config)


def build_backbone(config: dict[str, Any]) -> nn.Module:
    """The Flax energy module a converted model's config.json describes."""
    kind = config.get("model")
    if kind == "mace":
        from sparse_eqv.models.mace import MACE

        return MACE.from_config(config)
    if kind in ("nequip", "sevenn"):
        from sparse_eqv.models.nequip import NequIP

        return NequIP.from_config(config)
    raise UnsupportedModelError(f"config.json names model {kind!r}; known: mace, nequip, sevenn")
