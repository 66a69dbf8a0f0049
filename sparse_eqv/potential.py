"""Energy, forces and stress from a model that maps edge vectors to node energies.

Every model in `sparse_eqv.models` is a Flax module called as

    node_energies = module.apply(variables, vectors, species, senders, receivers)

with vectors (E, 3) Å from centre to neighbour (see `sparse_eqv.data.graph`),
species (N,) int32, senders/receivers (E,) int32, node_energies (N,) eV.
This module differentiates it once, over positions and a homogeneous strain:

    forces = -dE/dR                  (N, 3) eV/Å
    stress = (1/V) dE/d(strain)      (G, 3, 3) eV/Å^3, ASE sign convention
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import jraph

# Padding edges get the vector (0, 0, length): finite and non-zero, so no
# model takes the norm or the direction of a zero vector (whose gradient is
# NaN). At length = the model's cutoff every model's radial envelope is exactly
# zero, so padding edges carry no messages: otherwise the padding node, fed by
# all padding edges at once layer after layer, can overflow float32 (its
# energy is masked, but 0 * inf in the backward pass turns the gradient NaN).


def edge_vectors(
    positions: jax.Array, strain: jax.Array, graph: jraph.GraphsTuple, padding_length: float = 1.0
) -> jax.Array:
    """Edge vectors r_j + S @ cell - r_i under a homogeneous strain.

    Args:
        positions: (N, 3) Å.
        strain: (G, 3, 3) displacement gradient (zero for the physical geometry).
        graph: padded batch from `sparse_eqv.data.graph.batch_graphs`.
        padding_length: length of the padding edges' vector, Å.

    Returns:
        (E, 3) Å; padding edges hold (0, 0, padding_length).
    """
    n_graph = graph.n_node.shape[0]
    node_graph = jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=positions.shape[0])
    edge_graph = jnp.repeat(jnp.arange(n_graph), graph.n_edge, total_repeat_length=graph.senders.shape[0])
    symmetric = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
    deformation = jnp.eye(3, dtype=positions.dtype)[None] + symmetric
    strained_positions = jnp.einsum("ni,nij->nj", positions, deformation[node_graph])
    strained_cell = jnp.einsum("gki,gij->gkj", graph.globals["cell"].astype(positions.dtype), deformation)
    shift_vectors = jnp.einsum("ek,ekj->ej", graph.edges["shifts"].astype(positions.dtype), strained_cell[edge_graph])
    vectors = strained_positions[graph.senders] - strained_positions[graph.receivers] + shift_vectors
    real_edge = jraph.get_edge_padding_mask(graph)
    padding = jnp.asarray([0.0, 0.0, padding_length], dtype=positions.dtype)
    return jnp.where(real_edge[:, None], vectors, padding)


def energy_forces_stress(
    apply_fn: Callable[..., jax.Array], variables: Any, graph: jraph.GraphsTuple, cutoff: float | None = None
) -> dict[str, jax.Array]:
    """Predict energy (G,) eV, forces (N, 3) eV/Å and stress (G, 3, 3) eV/Å^3.

    Args:
        apply_fn: `module.apply`, called as apply_fn(variables, vectors,
            species, senders, receivers) -> (N,) node energies in eV, or
            -> ((N,) node energies, {name: per-node array}) for a model with
            extra per-node outputs computed in the same forward pass (e.g.
            `sparse_eqv.models.magmom`); those are not differentiated here.
        variables: the model's variables ({"params": ..., "constants": ...}).
        graph: padded batch. Stress is zero for non-periodic graphs (V = 0).
        cutoff: the model's r_max, Å: padding edges get this length, so they
            carry no messages (None: 1 Å, for models without a radial envelope).

    Returns:
        dict with "energy", "forces", "stress", "node_energies", and the
        model's extra per-node outputs by name.
    """
    positions = graph.nodes["positions"]
    n_graph = graph.n_node.shape[0]
    n_node = positions.shape[0]
    node_graph = jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=n_node)

    def total_energy(positions, strain):
        vectors = edge_vectors(positions, strain, graph, 1.0 if cutoff is None else cutoff)
        out = apply_fn(variables, vectors, graph.nodes["species"], graph.senders, graph.receivers)
        node_energies, node_outputs = out if isinstance(out, tuple) else (out, {})
        node_energies = jnp.where(jraph.get_node_padding_mask(graph), node_energies, 0.0)
        graph_energies = jax.ops.segment_sum(node_energies, node_graph, n_graph)
        return graph_energies.sum(), (graph_energies, node_energies, node_outputs)

    strain = jnp.zeros((n_graph, 3, 3), dtype=positions.dtype)
    (_, (energy, node_energies, node_outputs)), (d_positions, d_strain) = jax.value_and_grad(
        total_energy, argnums=(0, 1), has_aux=True
    )(positions, strain)
    volume = jnp.abs(jnp.linalg.det(graph.globals["cell"].astype(positions.dtype)))
    safe_volume = jnp.where(volume > 0, volume, 1.0)
    stress = jnp.where((volume > 0)[:, None, None], d_strain / safe_volume[:, None, None], 0.0)
    return {"energy": energy, "forces": -d_positions, "stress": stress, "node_energies": node_energies, **node_outputs}
