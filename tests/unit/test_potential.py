"""potential.py against ASE's Lennard-Jones calculator: energy, forces, stress.

The model here is a pair potential written as a Flax module with the same
call signature as the converted models; ASE computes the same potential
independently (its own neighbour list, analytic forces and virial stress).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.lj import LennardJones

from sparse_eqv.data.graph import batch_graphs, frame_to_graph
from sparse_eqv.data.readers import read_frames
from sparse_eqv.potential import energy_forces_stress

SIGMA, EPSILON, CUTOFF = 2.3, 0.4, 5.0


class PairLJ(nn.Module):
    """Truncated, shifted Lennard-Jones as a node-energy model (half of each pair per atom)."""

    @nn.compact
    def __call__(self, vectors, species, senders, receivers):
        r = jnp.linalg.norm(vectors, axis=-1)

        def lj(x):
            return 4 * EPSILON * ((SIGMA / x) ** 12 - (SIGMA / x) ** 6)

        pair = jnp.where(r < CUTOFF, lj(r) - lj(CUTOFF), 0.0)
        return 0.5 * jax.ops.segment_sum(pair, receivers, species.shape[0])


def ase_reference(frame):
    atoms = frame.to_atoms()
    atoms.calc = LennardJones(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, smooth=False)
    stress = atoms.get_stress(voigt=False) if frame.periodic else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def perturbed(frames, seed):
    rng = np.random.default_rng(seed)
    import dataclasses

    # rattle so that forces and shear stress are far from zero
    return [dataclasses.replace(f, positions=f.positions + rng.normal(0, 0.05, f.positions.shape)) for f in frames]


@pytest.mark.parametrize("source", ["cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz", "cu/mlearn_Cu_test.json"])
def test_energy_forces_stress_match_ase(real_frames_dir, source):
    frames = perturbed(read_frames(real_frames_dir / source)[:3], seed=0)
    graph = batch_graphs([frame_to_graph(f, [29], CUTOFF) for f in frames])
    out = jax.jit(lambda g: energy_forces_stress(PairLJ().apply, {}, g))(graph)
    offset = 0
    for index, frame in enumerate(frames):
        energy, forces, stress = ase_reference(frame)
        n = frame.num_atoms
        np.testing.assert_allclose(out["energy"][index], energy, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(out["forces"][offset : offset + n], forces, atol=1e-10)
        np.testing.assert_allclose(out["stress"][index], stress, atol=1e-12)
        offset += n


def test_molecule_without_cell(real_frames_dir):
    frames = read_frames(real_frames_dir / "rmd17" / "rmd17_aspirin_test_01.npz")[:2]
    graph = batch_graphs([frame_to_graph(f, [1, 6, 8], CUTOFF) for f in frames])
    out = energy_forces_stress(PairLJ().apply, {}, graph)
    for index, frame in enumerate(frames):
        energy, forces, _ = ase_reference(frame)
        np.testing.assert_allclose(out["energy"][index], energy, rtol=1e-12)
        np.testing.assert_allclose(out["forces"][index * 21 : (index + 1) * 21], forces, atol=1e-9 * np.abs(forces).max())
        assert np.all(out["stress"][index] == 0.0)
