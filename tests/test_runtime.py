"""Process settings: YNNPACK fusions off at import, malloc huge pages by re-execution (sparse_eqv.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import platform

import pytest

from sparse_eqv.runtime import MALLOC_HUGETLB, YNN_OFF, malloc_hugepages_environ, prefer_xla_cpu_emitters

# A float32 per-edge contraction as the models write it; prints whether XLA gave it to YNNPACK.
PROBE = """
import jax, jax.numpy as jnp
import sparse_eqv
f = jax.jit(lambda a, b: jnp.einsum("zui,zik->zuk", a, b))
hlo = f.lower(jnp.ones((64, 32, 3)), jnp.ones((64, 3, 5))).compile().as_text()
print("ynn" in hlo)
"""


def compiled_with_ynn(xla_flags: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_import_turns_ynnpack_off_and_keeps_other_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    prefer_xla_cpu_emitters(environ)
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", YNN_OFF]
    assert not compiled_with_ynn(None)


def test_a_users_ynnpack_setting_wins():
    environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    prefer_xla_cpu_emitters(environ)
    assert environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert compiled_with_ynn("--xla_cpu_experimental_ynn_fusion_type=individual_dot")


def test_malloc_hugepages_environ_adds_to_tunables_once():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert malloc_hugepages_environ({})["GLIBC_TUNABLES"] == MALLOC_HUGETLB
    env = malloc_hugepages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{MALLOC_HUGETLB}", "HOME": "/x"}
    assert malloc_hugepages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


PROBE_MODULE = """
import os, sys
from sparse_eqv.runtime import reexec_with_malloc_hugepages
if __name__ == "__main__":
    print("started", os.getpid(), flush=True)
    reexec_with_malloc_hugepages("probe_env")
    print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), *sys.argv[1:])
"""


def test_reexec_keeps_pid_and_arguments_and_sets_tunables(tmp_path):
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    (tmp_path / "probe_env.py").write_text(PROBE_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "probe_env", "a b", "--c"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    first, second, last = out  # started once before and once after the re-execution, then ran
    assert first.split()[1] == second.split()[1] == last.split()[1]
    assert last.split(" ", 2)[2] == f"{MALLOC_HUGETLB} a b --c"
