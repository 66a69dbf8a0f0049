"""sparse_eqv: sparsity-promoting fine-tuning of equivariant interatomic potentials in JAX."""

__version__ = "0.1.0"
