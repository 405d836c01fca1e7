"""jaxreg.runtime.retain_host_memory: measured by page faults in fresh processes (the
setting is process-wide and must come before JAX's first computation)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import jaxreg
from jaxreg import runtime

glibc_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's"
)

# A jitted program whose 64 MiB of temporaries (two 32 MiB intermediates kept apart by the
# optimization barrier) XLA allocates on every call. Retained, the heap still grows now
# and then over the first calls (up to ~20 here) until freed blocks fit the next call's;
# page faults are counted over 10 calls after 30.
_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import jaxreg.runtime
    applied = jaxreg.runtime.retain_host_memory() if sys.argv[1] == "retain" else None
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
        a, b = jax.lax.optimization_barrier((jnp.sin(x), jnp.cos(x)))
        return jnp.sum(a * b)

    x = jnp.linspace(0.0, 1.0, 8 * 2**20, dtype=jnp.float32)
    for _ in range(30):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        value = float(f(x))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps(dict(applied=applied, faults=faults, value=value)))
    """
)


def _transparent_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


def _probe(mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_linux
def test_retained_memory_is_not_faulted_in_again():
    retained, default = _probe("retain"), _probe("default")
    assert retained["applied"] is True
    # 10 calls x 64 MiB of temporaries = 163,840 pages of 4 KiB where each call faults them
    # in (as without the setting); retained, at most one growth of the heap by one call's.
    assert retained["faults"] <= 16384 + 1000, retained
    assert default["faults"] > 2 * 16384 or "always" in _transparent_huge_pages(), default
    # The setting changes where memory comes from, not what is computed.
    assert retained["value"] == default["value"]


@glibc_linux
def test_after_the_first_computation_it_changes_nothing_and_says_so():
    code = "import jax.numpy as jnp, jaxreg.runtime; jnp.ones(3).block_until_ready(); print(jaxreg.runtime.retain_host_memory())"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert "after JAX's first computation" in out.stderr


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *a, **k: pytest.fail("mallopt called on a non-glibc system"))
    assert runtime.retain_host_memory() is False


def test_exported_at_the_top():
    assert jaxreg.retain_host_memory is runtime.retain_host_memory
