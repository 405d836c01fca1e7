"""Geometry, filters and classical registration multiply float32 matrices in full precision.

GPUs run a float32 matrix product or convolution at the backend's default precision in
TF32 (10-bit mantissa). On an H200 that moved affine-mapped points by ~1e-3 of their
distance from the origin, put 1e-3 errors in Jacobian determinants and 3e-4 in Gaussian
smoothing. A CPU computes every precision alike, so these tests read the traced programs
instead: every ``dot_general`` and ``conv_general_dilated`` in them must ask for HIGHEST.
Networks are left out on purpose: their convolutions keep the backend's default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from jaxreg import metrics
from jaxreg.filters import downsample, gaussian_smooth
from jaxreg.grid import Grid, Image, precise_matmul
from jaxreg.losses import regularizers as R
from jaxreg.losses import similarity as S
from jaxreg.registration import register
from jaxreg.transforms import Affine, BSpline, Displacement, KernelTransform, Velocity, compose, invert, jacobian_determinant, warp

PRODUCTS = ("dot_general", "conv_general_dilated")


def imprecise_products(jaxpr) -> list[str]:
    """The matrix products and convolutions in ``jaxpr`` (and the programs inside it) that
    do not ask for HIGHEST precision, named by primitive and precision."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in PRODUCTS:
            precision = eqn.params.get("precision")
            pair = precision if isinstance(precision, tuple) else (precision, precision)
            if any(p != jax.lax.Precision.HIGHEST for p in pair):
                found.append(f"{eqn.primitive.name} at {precision}: {eqn.source_info.name_stack}")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    found += imprecise_products(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    found += imprecise_products(sub)
    return found


def assert_precise(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    assert imprecise_products(jaxpr) == []


def test_the_check_sees_a_default_precision_product_inside_a_loop():
    def body(x):
        return jax.lax.fori_loop(0, 2, lambda i, y: y @ x, x)

    assert len(imprecise_products(jax.make_jaxpr(body)(jnp.eye(3)).jaxpr)) == 1
    assert imprecise_products(jax.make_jaxpr(lambda x: precise_matmul(x, x))(jnp.eye(3)).jaxpr) == []


def test_precise_matmul_is_the_matrix_product_and_keeps_numpy_on_the_host():
    a = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    b = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    assert isinstance(precise_matmul(a, b), np.ndarray)
    np.testing.assert_array_equal(precise_matmul(jnp.asarray(a), b), a @ b)
    np.testing.assert_array_equal(jax.vmap(precise_matmul, (0, None))(jnp.stack([a, 2 * a]), b)[1], 2 * a @ b)


def _pair(ndim):
    shape = (20, 16, 12)[:ndim]
    rng = np.random.default_rng(ndim)
    affine = np.diag([1.2, 0.9, 1.1, 1.0][-ndim - 1 :]).astype(np.float32)
    affine[:ndim, ndim] = 3.0
    return rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32), affine


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("deformable,similarity", [
    ("svf", "lncc"), ("syn", "mse"), ("greedy", "ssim"), ("bspline", "mi"), ("svf", "mind"), ("greedy", "ngf"),
])
def test_registration_programs_multiply_in_full_precision(ndim, deformable, similarity):
    fixed, moving, affine = _pair(ndim)

    def run(f, m):
        result = register(Image(f, affine), Image(m, affine), affine="affine", deformable=deformable,
                          similarity=similarity, shrink=(2, 1), steps=(2, 2))
        return result.warped.data, result.transform(Grid(f.shape, affine).points())

    assert_precise(run, fixed, moving)


@pytest.mark.parametrize("ndim", [2, 3])
def test_transforms_jacobians_and_metrics_multiply_in_full_precision(ndim):
    fixed, _, affine = _pair(ndim)
    grid = Grid(fixed.shape, affine)
    field = 0.3 * np.random.default_rng(0).standard_normal(grid.shape + (ndim,)).astype(np.float32)
    coefficients = 0.3 * np.random.default_rng(1).standard_normal((6, 5, 4)[:ndim] + (ndim,)).astype(np.float32)
    points = grid.points()[:4].reshape(-1, ndim)

    def run(params, field, coefficients, image):
        linear = Affine.from_params(params, kind="affine", ndim=ndim, center=jnp.ones(ndim))
        dense = Displacement(field, affine)
        velocity = Velocity(field, affine)
        spline = BSpline(coefficients, Grid(coefficients.shape[:-1], affine).affine)
        kernel = KernelTransform.fit(points, points + 0.5, sigma=10.0)
        chain = compose(linear, dense, linear.inverse() @ linear)
        outputs = [jacobian_determinant(t, grid) for t in (linear, dense, velocity, spline, kernel, chain)]
        outputs.append(invert(dense, grid=grid).field)
        outputs.append(warp(Image(image, affine), chain, grid).data)
        outputs.append(metrics.inverse_consistency_error(velocity, velocity.inverse(), grid.points()))
        outputs.append(R.diffusion()(field, grid) + R.bending()(field, grid) + R.jacobian_folding()(field, grid))
        outputs.append(gaussian_smooth(image, 1.5) + 0.0 * image)
        outputs.append(downsample(image, 2).sum())
        outputs.append(S.ssim()(image, 2.0 * image) + S.lncc(radius=2)(image, image + 1.0))
        return outputs

    params = jnp.asarray(np.random.default_rng(2).uniform(-0.1, 0.1, ndim * ndim + ndim), jnp.float32)
    assert_precise(run, params, field, coefficients, fixed)
    assert_precise(jax.grad(lambda p, f, c, i: sum(jnp.sum(o) for o in run(p, f, c, i)), argnums=(0, 1, 2)), params, field, coefficients, fixed)
