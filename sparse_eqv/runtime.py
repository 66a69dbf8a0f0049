"""Process-wide settings that make the models faster on CPU.

XLA:CPU without YNNPACK fusions (`prefer_xla_cpu_emitters`, applied when
`sparse_eqv` is imported). jaxlib 0.10 hands float32 dot products on CPU to
YNNPACK fusions. The models' per-edge contractions (E-batched
(C, 2l1+1) x (2l1+1, 2l3+1) products, the radial MLPs on E rows) run slower
there than in XLA's own emitters: on 2 cores, with
`--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK fusions off), SevenNet-0's
float32 STR train step on 4 Cu frames of 107 atoms took 6.7 instead of
10.2 CPU s, and the MACE-MP-0b3-medium-size model's 7.7 instead of 8.9 CPU s
(`docs/performance.md`). XLA reads XLA_FLAGS when JAX creates its first
backend, so this only takes effect if `sparse_eqv` is imported before the
first JAX computation. A YNNPACK setting already in XLA_FLAGS is left alone:
that is how to opt out, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_dot`. GPU and
TPU backends ignore the option.

Huge pages for glibc's malloc (`reexec_with_malloc_hugepages`, done by the
`sparse-eqv` command). XLA:CPU allocates a step's temporaries afresh on every
call, and the kernel zero-fills each new 4 KiB page: SevenNet-0's float32
train step above took 0.97 M page faults and 1.7 s of system time per step.
With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` malloc asks for transparent huge
pages, the faults fall to 2.5 k and the step from 3.4 to 2.4-2.7 s wall
(torch's training step gains about as much from the same setting). glibc
reads GLIBC_TUNABLES only at process start, so the command re-executes itself
once with it set; in your own Python process, export it before starting
Python. A hugetlb setting already in GLIBC_TUNABLES is left alone (set
`glibc.malloc.hugetlb=0` to opt out). Without glibc, or with transparent huge
pages disabled in the kernel, it changes nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
MALLOC_HUGETLB = "glibc.malloc.hugetlb=1"


def prefer_xla_cpu_emitters(environ: MutableMapping[str, str] = os.environ) -> None:
    """Append YNN_OFF to environ["XLA_FLAGS"] unless it already sets a YNNPACK fusion type."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()


def malloc_hugepages_environ(environ: MutableMapping[str, str]) -> dict[str, str] | None:
    """environ with MALLOC_HUGETLB added to GLIBC_TUNABLES, or None if there is nothing to add.

    None without glibc, or when GLIBC_TUNABLES already sets glibc.malloc.hugetlb.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{MALLOC_HUGETLB}" if tunables else MALLOC_HUGETLB}


def reexec_with_malloc_hugepages(module: str) -> None:
    """Replace this process by `python -m module <same arguments>` with malloc huge pages, if not set yet.

    Same pid, stdin/stdout/stderr and working directory; returns only when
    there is nothing to change.
    """
    environ = malloc_hugepages_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], environ)
