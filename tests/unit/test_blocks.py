"""Blocked evaluations in `sparse_eqv.models.blocks` against their one-shot definitions, derivatives included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_eqv.models.blocks import per_element_product


def test_per_element_product_over_node_blocks_matches_the_one_hot_product():
    """11 nodes in blocks of 4 (the last one padded): values, forces-style and training-style derivatives."""
    rng = np.random.default_rng(0)
    n_nodes, mul_in, dim, n_elements, mul_out = 11, 5, 3, 7, 6
    x = jnp.asarray(rng.normal(size=(n_nodes, mul_in, dim)))
    w = jnp.asarray(rng.normal(size=(mul_in, n_elements, mul_out)))
    species = jnp.asarray(rng.integers(0, n_elements, n_nodes))
    g = jnp.asarray(rng.normal(size=(n_nodes, mul_out, dim)))
    h = jnp.asarray(rng.normal(size=(n_nodes, mul_in, dim)))

    def definition(x, w):  # e3nn's 'uvw' path with one_hot(species) as the second operand
        return jnp.einsum("zui,zv,uvo->zoi", x, jax.nn.one_hot(species, n_elements, dtype=x.dtype), w)

    def blocked(x, w):
        return per_element_product(x, species, w, node_block=4)

    for product in (definition, blocked):
        assert product(x, w).shape == (n_nodes, mul_out, dim)
    np.testing.assert_allclose(blocked(x, w), definition(x, w), rtol=1e-12, atol=1e-12)

    def energy(product):
        return lambda x, w: jnp.sum(product(x, w) * g)

    for argnum in (0, 1):
        np.testing.assert_allclose(
            jax.grad(energy(blocked), argnum)(x, w), jax.grad(energy(definition), argnum)(x, w), rtol=1e-12, atol=1e-12
        )

    def force_loss(product):  # the weight gradient of a loss on d(energy)/dx, as in a force-matching step
        return lambda w: jnp.sum(jax.grad(energy(product), 0)(x, w) * h)

    np.testing.assert_allclose(jax.grad(force_loss(blocked))(w), jax.grad(force_loss(definition))(w), rtol=1e-12, atol=1e-12)
