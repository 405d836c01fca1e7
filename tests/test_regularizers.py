import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.grid import Grid, precise_matmul
from jaxreg.losses import regularizers as R
from helpers import (
    assert_finite_grad,
    assert_grad_matches_fd,
    assert_jit_matches,
    assert_vmap_matches_loop,
)

SHAPES = {2: (24, 20), 3: (12, 10, 8)}
SPACINGS = {2: (1.5, 0.75), 3: (2.0, 1.0, 0.5)}
FACTORIES = {
    "diffusion": R.diffusion(),
    "bending": R.bending(),
    "tv": R.total_variation(),
    "tv_aniso": R.total_variation(isotropic=False),
    "l1": R.sparsity(norm="l1"),
    "l2": R.sparsity(norm="l2"),
    "folding": R.jacobian_folding(margin=0.1),
}
# eps=0 only changes gradients where the field's gradient vanishes.
ZERO_GRAD_FACTORIES = {**FACTORIES, "tv_eps0": R.total_variation(eps=0.0)}


def centred_grid(shape, spacing):
    # Origin at the centre keeps coordinates small, so float32 differences of quadratics stay accurate.
    origin = [-(n - 1) / 2 * h for n, h in zip(shape, spacing)]
    return Grid.from_spacing(shape, spacing, origin=origin)


def linear_field(ndim, spacing, seed=0, scale=0.2):
    A = np.random.default_rng(seed).normal(scale=scale, size=(ndim, ndim)).astype(np.float32)
    x = centred_grid(SHAPES[ndim], spacing).points()
    return precise_matmul(x, jnp.asarray(A).T), A  # a GPU would round a default-precision product to TF32


def smooth_field(ndim, seed=0, amplitude=0.3):
    rng = np.random.default_rng(seed)
    x = Grid(SHAPES[ndim]).index_points()
    phase = rng.uniform(0, 2 * np.pi, size=ndim)
    comps = [amplitude * jnp.sin(0.3 * x[..., (k + 1) % ndim] + phase[k]) * jnp.cos(0.2 * x[..., k]) for k in range(ndim)]
    return jnp.stack(comps, axis=-1)


def test_registry():
    assert set(R.REGULARIZERS) == {"diffusion", "bending", "total_variation", "sparsity", "jacobian_folding"}
    for factory in R.REGULARIZERS.values():
        assert callable(factory())


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("spacing_kind", ["tuple", "array", "grid"])
def test_linear_field_diffusion_bending_tv(ndim, spacing_kind):
    spacing = SPACINGS[ndim]
    u, A = linear_field(ndim, spacing)
    sp = {"tuple": spacing, "array": jnp.asarray(spacing), "grid": centred_grid(SHAPES[ndim], spacing)}[spacing_kind]
    eps = 1e-6
    energies = (R.diffusion(), R.bending(), R.total_variation(eps=eps), R.total_variation(isotropic=False))
    diff, bend, tv, tv_aniso = jax.jit(lambda v, s: [f(v, s) for f in energies])(u, sp)  # one compile
    np.testing.assert_allclose(diff, np.sum(A**2), rtol=1e-4)
    np.testing.assert_allclose(bend, 0.0, atol=1e-6)
    np.testing.assert_allclose(tv, np.sum(np.sqrt(np.sum(A**2, axis=1) + eps)), rtol=1e-4)
    np.testing.assert_allclose(tv_aniso, np.sum(np.abs(A)), rtol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_quadratic_bending_is_hessian_norm(ndim):
    # u_k = x^T H_k x / 2 has constant Hessian H_k; every stencil term is averaged over its own
    # valid positions, so the boundary does not enter and the energy is sum_k ||H_k||_F^2.
    spacing = SPACINGS[ndim]
    rng = np.random.default_rng(1)
    H = rng.normal(scale=0.05, size=(ndim, ndim, ndim))
    H = (H + np.swapaxes(H, 1, 2)) / 2
    x = np.asarray(centred_grid(SHAPES[ndim], spacing).points(), dtype=np.float64)
    u = 0.5 * np.einsum("...i,kij,...j->...k", x, H, x) + x @ rng.normal(size=(ndim, ndim))
    u = jnp.asarray(u, jnp.float32)
    np.testing.assert_allclose(jax.jit(R.bending())(u, spacing), np.sum(H**2), rtol=2e-3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_anisotropic_spacing_scales_derivatives(ndim):
    # A field given per voxel index: in mm, du_k/dx_i = A_ki / h_i and d2u/dx_i dx_j = H / (h_i h_j).
    spacing = np.asarray(SPACINGS[ndim])
    rng = np.random.default_rng(2)
    A = rng.normal(scale=0.1, size=(ndim, ndim))
    idx = np.asarray(Grid(SHAPES[ndim]).index_points(), dtype=np.float64)
    u = jnp.asarray(idx @ A.T, jnp.float32)
    expected = np.sum((A / spacing[None, :]) ** 2)
    np.testing.assert_allclose(jax.jit(R.diffusion())(u, tuple(spacing)), expected, rtol=1e-4)
    np.testing.assert_allclose(jax.jit(R.diffusion())(u, 1.0), np.sum(A**2), rtol=1e-4)
    np.testing.assert_allclose(jax.jit(R.diffusion())(u, 2.0), np.sum(A**2) / 4, rtol=1e-4)

    H = np.zeros((ndim, ndim, ndim))
    H[0, 0, 1] = H[0, 1, 0] = 0.01  # u_0 = 0.01 i_0 i_1: mixed term only
    H[-1, 0, 0] = 0.02  # u_last = 0.01 i_0^2: pure term along axis 0
    q = jnp.asarray(0.5 * np.einsum("...i,kij,...j->...k", idx, H, idx), jnp.float32)
    expected = np.sum((H / np.outer(spacing, spacing)[None]) ** 2)
    np.testing.assert_allclose(jax.jit(R.bending())(q, tuple(spacing)), expected, rtol=1e-3)


def test_sparsity_values():
    u = jnp.asarray(np.random.default_rng(3).normal(size=(24, 20, 2)), jnp.float32)
    np.testing.assert_allclose(jax.jit(R.sparsity(norm="l1"))(u), np.mean(np.sum(np.abs(np.asarray(u)), -1)), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(R.sparsity(norm="l2"))(u, 3.0), np.mean(np.sum(np.asarray(u) ** 2, -1)), rtol=1e-5)
    with pytest.raises(ValueError, match="norm"):
        R.sparsity(norm="l3")


@pytest.mark.parametrize("ndim", [2, 3])
def test_folding(ndim):
    small = smooth_field(ndim, amplitude=0.2)
    assert float(jax.jit(R.jacobian_folding())(small)) == 0.0
    assert float(jax.jit(R.jacobian_folding())(small, SPACINGS[ndim])) == 0.0
    for margin in (0.0, 0.3):
        x = centred_grid(SHAPES[ndim], SPACINGS[ndim]).points()
        folded = jnp.zeros_like(x).at[..., 0].set(-2.0 * x[..., 0])  # det(I + grad u) = -1 everywhere
        np.testing.assert_allclose(jax.jit(R.jacobian_folding(margin=margin))(folded, SPACINGS[ndim]), margin + 1.0, rtol=1e-5)


def test_folding_is_spacing_aware():
    idx = Grid(SHAPES[2]).index_points()
    u = jnp.zeros_like(idx).at[..., 0].set(-1.5 * idx[..., 0])  # -1.5 mm per voxel along axis 0
    np.testing.assert_allclose(jax.jit(R.jacobian_folding())(u, 1.0), 0.5, rtol=1e-5)  # det = -0.5
    assert float(jax.jit(R.jacobian_folding())(u, (3.0, 1.0))) == 0.0  # det = 1 - 0.5
    np.testing.assert_allclose(jax.jit(R.jacobian_folding(margin=0.75))(u, (3.0, 1.0)), 0.25, rtol=1e-5)


def test_folding_oblique_grid_is_exact():
    theta = 0.4
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    affine = np.eye(3)
    affine[:2, :2] = rot @ np.diag([2.0, 0.5]) @ np.array([[1.0, 0.3], [0.0, 1.0]])  # rotated, sheared
    grid = Grid(SHAPES[2], affine)
    A = np.array([[-1.6, 0.3], [0.2, 0.1]], np.float32)
    u = precise_matmul(grid.points(), jnp.asarray(A).T)
    det = np.linalg.det(np.eye(2) + A)
    assert det < 0
    np.testing.assert_allclose(jax.jit(R.jacobian_folding(margin=0.2))(u, grid), 0.2 - det, rtol=1e-4)
    # The rotation-invariant diffusion energy only needs the voxel sizes of a non-sheared grid.
    ortho = Grid(SHAPES[2], np.block([[rot @ np.diag([2.0, 0.5]), np.zeros((2, 1))], [np.zeros((1, 2)), np.ones((1, 1))]]))
    np.testing.assert_allclose(jax.jit(R.diffusion())(precise_matmul(ortho.points(), jnp.asarray(A).T), ortho), np.sum(A**2), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("ndim", [2, 3])
def test_jit_vmap(name, ndim):
    f = FACTORIES[name]
    rng = np.random.default_rng(4)
    fields = jnp.asarray(rng.normal(scale=0.5, size=(3, *SHAPES[ndim], ndim)), jnp.float32)
    spacings = jnp.asarray(rng.uniform(0.5, 2.0, size=(3, ndim)), jnp.float32)
    if ndim == 3:  # eager runs compile every primitive: once per factory, on the rank with most terms
        assert_jit_matches(f, fields[0], spacings[0])
    value = jax.jit(f)(fields[0], spacings[0])
    assert value.shape == () and value.dtype == jnp.float32
    # The loop runs the jitted function: one compile instead of slow eager dispatch per sample.
    assert_vmap_matches_loop(jax.jit(f), fields, spacings)


@pytest.mark.parametrize("name", sorted(ZERO_GRAD_FACTORIES))
@pytest.mark.parametrize("ndim", [2, 3])
def test_grad_matches_fd_and_is_finite_at_zero(name, ndim):
    f = ZERO_GRAD_FACTORIES[name]
    shape = {2: (6, 5), 3: (4, 4, 3)}[ndim]
    u = np.random.default_rng(5).normal(scale=0.4, size=(*shape, ndim))
    spacing = SPACINGS[ndim]
    # jit: eager op-by-op dispatch of the stencils dominates the runtime otherwise.
    energy = jax.jit(lambda v: f(v, spacing))
    assert_grad_matches_fd(energy, u, eps=1e-4)
    # A zero field: sqrt and |.| at 0 must not give NaN; zero is a minimum of every energy
    # (folding is flat there), and the subgradient chosen there is 0.
    with jax.enable_x64(True):  # same dtype as above, so the compiled gradient is reused
        grad = assert_finite_grad(energy, jnp.zeros(u.shape, jnp.float64))
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_wrong_shapes_raise(name):
    f = FACTORIES[name]
    with pytest.raises(ValueError, match=r"\(\*spatial, d\)"):
        f(jnp.zeros((24, 20, 3)))
    with pytest.raises(ValueError, match=r"\(\*spatial, d\)"):
        f(jnp.zeros((24, 20)))
    with pytest.raises(ValueError, match="spacing"):
        f(jnp.zeros((24, 20, 2)), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="grid"):
        f(jnp.zeros((24, 20, 2)), Grid((20, 24)))
    with pytest.raises(TypeError, match="floating"):
        f(jnp.zeros((24, 20, 2), jnp.int32))


def test_degenerate_axes_are_skipped():
    # An axis of length 1 carries no derivative: a 2-D field on a (n, 1) grid behaves like 1-D.
    u = jnp.stack([jnp.arange(6.0), jnp.zeros(6)], axis=-1)[:, None, :] * 0.5
    np.testing.assert_allclose(jax.jit(R.diffusion())(u), 0.25, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(R.bending())(u), 0.0, atol=1e-7)
    assert np.isfinite(float(jax.jit(R.total_variation())(u)))
