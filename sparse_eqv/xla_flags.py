"""XLA:CPU options the models run fastest with, set when `sparse_eqv` is imported.

jaxlib 0.10 hands float32 dot products on CPU to YNNPACK fusions. The models'
per-edge contractions (E-batched (C, 2l1+1) x (2l1+1, 2l3+1) products, the
radial MLPs on E rows) run slower there than in XLA's own emitters: on 2
cores, with `--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK fusions off),
SevenNet-0's float32 STR train step on 4 Cu frames of 107 atoms took 6.7
instead of 10.2 CPU s, and a 108-atom prediction 0.69 instead of 0.77 CPU s;
the MACE-MP-0b3-medium-size model's train step 7.7 instead of 8.9 CPU s and
its prediction 0.81 instead of 1.08 CPU s (`docs/performance.md`).

XLA reads XLA_FLAGS when JAX creates its first backend, so this only takes
effect if `sparse_eqv` is imported before the first JAX computation (the CLI
always is). A YNNPACK setting already in XLA_FLAGS is left alone: that is how
to opt out, e.g. `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_dot`.
The option is CPU-only; GPU and TPU backends ignore it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def prefer_xla_cpu_emitters(environ: MutableMapping[str, str] = os.environ) -> None:
    """Append YNN_OFF to environ["XLA_FLAGS"] unless it already sets a YNNPACK fusion type."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
