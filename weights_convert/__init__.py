"""The torch side of sparse_eqv: read torch checkpoints and convert them to Flax pytrees (and back)."""
