"""Checks every public function goes through: jit, vmap-equals-loop, grad-equals-FD.

Kept in one place so a new similarity, regularizer or transform is tested the same way as
the ones already here (see docs/extending.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

SHARED_DATA = Path(os.environ.get("JAXREG_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """Path to a file under ../shared/data; skips the calling test where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def assert_jit_matches(f, *args, rtol=1e-5, atol=1e-6):
    """``jit(f)`` gives what eager ``f`` gives."""
    eager = f(*args)
    jitted = jax.jit(f)(*args)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol), eager, jitted)
    return eager


def assert_vmap_matches_loop(f, *batched_args, rtol=1e-5, atol=1e-6):
    """``vmap(f)`` over the leading axis of every argument equals a Python loop."""
    batch = jax.tree_util.tree_leaves(batched_args)[0].shape[0]
    vmapped = jax.vmap(f)(*batched_args)
    for i in range(batch):
        single = f(*jax.tree_util.tree_map(lambda a: a[i], batched_args))
        jax.tree_util.tree_map(
            lambda v, s: np.testing.assert_allclose(np.asarray(v)[i], np.asarray(s), rtol=rtol, atol=atol),
            vmapped,
            single,
        )
    return vmapped


def assert_grad_matches_fd(f, x, *, eps=1e-3, rtol=2e-2, atol=1e-4, directions=3, seed=0):
    """Reverse-mode gradient of scalar ``f`` at ``x`` agrees with central differences.

    Runs in float64 (``jax.enable_x64``) so that the finite differences are accurate;
    compares directional derivatives along random unit directions.
    """
    with jax.enable_x64(True):
        x64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), x)
        grad = jax.jit(jax.grad(f))(x64)
        f = jax.jit(f)
        rng = np.random.default_rng(seed)
        for _ in range(directions):
            v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), x64)
            norm = np.sqrt(sum(float(jnp.sum(a**2)) for a in jax.tree_util.tree_leaves(v)))
            v = jax.tree_util.tree_map(lambda a: a / norm, v)
            plus = f(jax.tree_util.tree_map(lambda a, b: a + eps * b, x64, v))
            minus = f(jax.tree_util.tree_map(lambda a, b: a - eps * b, x64, v))
            numeric = (float(plus) - float(minus)) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, b)) for g, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(v)))
            assert np.isfinite(analytic), "gradient is not finite"
            np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)
    return grad


def assert_finite_grad(f, x):
    """Gradient exists and is finite everywhere (e.g. on a constant image)."""
    grad = jax.grad(f)(x)
    for leaf in jax.tree_util.tree_leaves(grad):
        assert np.all(np.isfinite(np.asarray(leaf))), "gradient has NaN or Inf"
    return grad


@contextlib.contextmanager
def time_limit(seconds: int):
    """TimeoutError if the block runs longer than ``seconds`` (where SIGALRM exists)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fail(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def oblique_affine(ndim, seed=0, *, rng=None, shear=0.2, spacing=(0.5, 3.0), offset=100.0):
    """A rotated, sheared, anisotropic voxel-to-world matrix with a translation (float32).

    Drawn from ``rng`` (default ``numpy.random.default_rng(seed)``): shear terms of scale
    ``shear``, voxel sizes in ``spacing``, translation within ``±offset``.
    """
    rng = np.random.default_rng(seed) if rng is None else rng
    q, _ = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    shear_matrix = np.eye(ndim) + np.triu(shear * rng.standard_normal((ndim, ndim)), 1)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = q @ shear_matrix @ np.diag(rng.uniform(*spacing, ndim))
    affine[:ndim, ndim] = rng.uniform(-offset, offset, ndim)
    return affine.astype(np.float32)


def smooth_field(grid, amplitude, seed=0, sigma=3.0):
    """A smooth random vector field ``(*grid.shape, d)`` in mm on ``grid``, largest component ``amplitude``."""
    from jaxreg.filters import gaussian_smooth

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(grid.shape + (grid.ndim,)).astype(np.float32)
    field = np.asarray(gaussian_smooth(noise, sigma, ndim=grid.ndim))
    return (amplitude * field / np.abs(field).max()).astype(np.float32)
