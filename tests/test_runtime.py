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
# and then, in bursts, until freed blocks fit the next call's (mostly over the first 30
# calls, in some runs later); page faults are counted call by call over 20 calls after 50.
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
    for _ in range(50):
        f(x).block_until_ready()
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        value = float(f(x))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
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
    # A call that faults its 64 MiB of temporaries in takes 16,384 pages of 4 KiB. Without
    # the setting every call does; retained, most calls fault nothing.
    faulting = lambda run: sum(count > 1000 for count in run["faults"])  # noqa: E731
    assert faulting(retained) <= 8, retained
    assert faulting(default) >= 16 or "always" in _transparent_huge_pages(), default
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
