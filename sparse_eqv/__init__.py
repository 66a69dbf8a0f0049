"""sparse_eqv: sparsity-promoting fine-tuning of equivariant interatomic potentials in JAX."""

from sparse_eqv.xla_flags import prefer_xla_cpu_emitters

prefer_xla_cpu_emitters()

__version__ = "0.1.0"
