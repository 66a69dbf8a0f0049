"""A per-atom magnetic-moment head on a backbone's node features.

    moments = MagmomHead(...).apply({"params": head}, features_t, species)

kind "scalar" (default): |m_i| in μB, invariant. An MLP of layer t's 0e
    features s_i (t = the last layer) plus a per-element offset:

        |m|_i = W_2 silu(W_1 s_i) + b[type_i]

kind "vector": m_i in μB, Cartesian (x, y, z), equivariant. The l = 1
    chunks v_iu (u = 1..U) of the last layer that has any, mixed with
    invariant coefficients c_i = W_2 silu(W_1 s_i) (W_2: H x U):

        m_i = sum_u c_iu v_iu / sqrt(U)

    No offset (a constant vector would break equivariance). A magnetic moment
    is an axial vector (1e): the head reads 1e features where the layer has
    them (SevenNet), else 1o (MACE, nequip): those moments rotate with the
    structure but change sign under inversion. From the geometry alone a
    vector head predicts only directions the structure defines (e.g. not a
    collinear antiferromagnet's global spin axis, which DFT chooses freely).

Only 0e scalars feed the MLP (0o ones change sign under inversion). Its
layers are normalised as e3nn's (and the backbones' own MLPs): no biases,
weights ~ N(0, 1), each product divided by sqrt(fan-in), which keeps the
step an optimiser takes on 128 features as gentle as on 4. The backbones
return their per-layer features with `return_features=True` (`NequIP`,
`MACE`), a flag that is off by default, so a model without a head computes
exactly what it always did.

`MagmomModel` pairs a backbone with a head and is called like a backbone:
apply(variables, vectors, species, senders, receivers) -> (node energies (N,)
eV, {"magmoms": (N,) or (N, 3) μB}), the form
`sparse_eqv.potential.energy_forces_stress` accepts. The head's params are
variables["params"]["magmom_head"]; every other leaf is the backbone's, so
converters, export and sparsity counts never see the head. A model
directory's config["magmom"] describes it:

    {"kind": "scalar" | "vector", "layer": t, "irreps_in": irreps of layer t,
     "vector_irrep": "1e" | "1o" | null, "hidden": H}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_eqv.errors import UnsupportedModelError
from sparse_eqv.models.nequip import chunks, parse_irreps

HEAD_KEY = "magmom_head"
KINDS = ("scalar", "vector")


def head_config(feature_irreps: tuple[str, ...], kind: str = "scalar", hidden: int = 16) -> dict[str, Any]:
    """config["magmom"] for a backbone whose layers output `feature_irreps`.

    Raises UnsupportedModelError for an unknown kind, a backbone without 0e
    features in the chosen layer, or (vector) without any l = 1 features.
    """
    if kind not in KINDS:
        raise UnsupportedModelError(f"magnetic-moment head {kind!r}; known: {', '.join(KINDS)}")
    layers = [parse_irreps(irreps) for irreps in feature_irreps]
    layer, vector_irrep = len(layers) - 1, None
    if kind == "vector":
        with_l1 = [t for t, irreps in enumerate(layers) if any(l == 1 for _, l, _ in irreps)]
        if not with_l1:
            raise UnsupportedModelError(
                f"--magmom vector needs l=1 node features; this model's layers output {', '.join(feature_irreps)}"
            )
        layer = with_l1[-1]
        parities = {p for _, l, p in layers[layer] if l == 1}
        vector_irrep = "1e" if 1 in parities else "1o"
    if not any((l, p) == (0, 1) for _, l, p in layers[layer]):
        raise UnsupportedModelError(f"layer {layer} outputs {feature_irreps[layer]}: no 0e scalars for the head")
    return {"kind": kind, "layer": layer, "irreps_in": feature_irreps[layer], "vector_irrep": vector_irrep,
            "hidden": int(hidden)}


class MagmomHead(nn.Module):
    """Moments from one layer's flat features (N, dim) laid out as `irreps_in`.

    Returns (N,) |m| (scalar) or (N, 3) m (vector), μB.
    """

    kind: str
    irreps_in: str
    num_types: int
    hidden: int = 16
    vector_irrep: str | None = None

    @nn.compact
    def __call__(self, features: jax.Array, species: jax.Array) -> jax.Array:
        irreps = parse_irreps(self.irreps_in)
        blocks = chunks(features, irreps)
        scalars = jnp.concatenate([b[..., 0] for b, (_, l, p) in zip(blocks, irreps) if (l, p) == (0, 1)], axis=1)
        dtype = features.dtype
        h = jax.nn.silu(self._linear("hidden", scalars, self.hidden))
        if self.kind == "scalar":
            bias = self.param("bias", nn.initializers.zeros, (self.num_types,), dtype)
            return self._linear("out", h, 1)[:, 0] + bias[species]
        parity = {"1e": 1, "1o": -1}[self.vector_irrep]
        vectors = jnp.concatenate([b for b, (_, l, p) in zip(blocks, irreps) if (l, p) == (1, parity)], axis=1)
        coefficients = self._linear("out", h, vectors.shape[1])
        return jnp.einsum("nu,nui->ni", coefficients, vectors) / math.sqrt(vectors.shape[1])

    def _linear(self, name: str, x: jax.Array, features: int) -> jax.Array:
        w = self.param(name, nn.initializers.normal(1.0), (x.shape[1], features), x.dtype)
        return x @ w / math.sqrt(x.shape[1])


@dataclasses.dataclass(frozen=True)
class MagmomModel:
    """A backbone (NequIP / MACE module) with a moment head, called like a backbone.

    Attributes:
        backbone: the energy model, as `build_backbone(config)` returns it.
        head: the head module.
        layer: index of the backbone layer whose features the head reads.
    """

    backbone: nn.Module
    head: MagmomHead
    layer: int

    @staticmethod
    def attach(backbone: nn.Module, head: dict[str, Any], num_types: int) -> "MagmomModel":
        """The backbone with the head that `head` (a `head_config`) describes."""
        expected = backbone.feature_irreps()
        if head["layer"] >= len(expected) or expected[head["layer"]] != head["irreps_in"]:
            raise UnsupportedModelError(
                f"the moment head reads {head['irreps_in']} features of layer {head['layer']}, but this model's "
                f"layers output {', '.join(expected)}: the head belongs to another architecture"
            )
        module = MagmomHead(head["kind"], head["irreps_in"], num_types, head["hidden"], head["vector_irrep"])
        return MagmomModel(backbone, module, head["layer"])

    def init_head(self, rng: jax.Array, dtype=jnp.float64) -> Any:
        """Fresh head params (flax default initialisers, zero per-element offsets)."""
        dim = sum(m * (2 * l + 1) for m, l, _ in parse_irreps(self.head.irreps_in))
        return jax.jit(self.head.init)(rng, jnp.zeros((1, dim), dtype), jnp.zeros((1,), jnp.int32))["params"]

    def init(self, rng: jax.Array, vectors, species, senders, receivers) -> dict[str, Any]:
        """Backbone variables (its own `init`) with fresh head params added."""
        rng_backbone, rng_head = jax.random.split(rng)
        variables = self.backbone.init(rng_backbone, vectors, species, senders, receivers)
        params = {**variables["params"], HEAD_KEY: self.init_head(rng_head, vectors.dtype)}
        return {**variables, "params": params}

    def apply(self, variables, vectors, species, senders, receivers):
        """(node energies (N,) eV, {"magmoms": (N,) or (N, 3) μB})."""
        params = dict(variables["params"])
        head_params = params.pop(HEAD_KEY)
        energies, features = self.backbone.clone(return_features=True).apply(
            {**variables, "params": params}, vectors, species, senders, receivers
        )
        moments = self.head.apply({"params": head_params}, features[self.layer], species)
        return energies, {"magmoms": moments}
