"""Importing sparse_eqv turns XLA:CPU's YNNPACK fusions off, unless XLA_FLAGS already chooses."""

from __future__ import annotations

import os
import subprocess
import sys

from sparse_eqv.xla_flags import YNN_OFF, prefer_xla_cpu_emitters

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
