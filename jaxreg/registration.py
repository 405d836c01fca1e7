"""Classical registration: minimise ``similarity(warp(moving, T), fixed) + lambda * reg(T)``.

The pieces, each usable alone:

- :func:`minimize` runs any optax optimizer on any energy for a fixed number of steps
  inside one jitted ``lax.scan`` and returns the parameters and the loss history;
- :func:`smooth_updates` and :func:`cap_step` are the registration tricks as optax
  transforms that chain (Gaussian smoothing of a dense update, ANTs/FireANTs style; a
  per-voxel bound on the step);
- :func:`register_affine` and :func:`register_svf` run one stage over an image pyramid,
  coarse to fine, one compiled program per level;
- :func:`register` chains them (affine, then SVF refinement) into a :class:`Result`.

Everything is a pure function of arrays, so ``jax.vmap(register_svf...)`` over a batch of
same-shape pairs works as it is.

Status (issue 3): this is the optimisation core. Not yet here: greedy/SyN and B-spline
stages, L-BFGS presets, masks and landmarks in the energy, convergence stopping, the
``jaxreg`` command, ITK/ANTs transform export and the comparison with ANTs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxreg import _checks
from jaxreg.filters import gaussian_smooth, pyramid
from jaxreg.grid import Grid, Image, as_image
from jaxreg.losses import regularizers, similarity
from jaxreg.transforms import Affine, Displacement, Transform, Velocity, affine_param_count, compose, warp

__all__ = [
    "Result",
    "minimize",
    "smooth_updates",
    "cap_step",
    "register_affine",
    "register_svf",
    "register",
]


class Result(NamedTuple):
    """What a registration returns: ``transform`` maps fixed world points to moving ones."""

    transform: Transform
    inverse: Transform | None
    warped: Image
    losses: tuple  # one loss history array per pyramid level, coarse to fine


# ------------------------------------------------------------------------- optimisation


def minimize(energy: Callable, params, optimizer: optax.GradientTransformation, *, steps: int):
    """Minimise ``energy(params)`` with ``optimizer`` for ``steps`` steps in one ``lax.scan``.

    Returns ``(params, history)`` where ``history[i]`` is the energy before step ``i``.
    Jit the caller (or this) to compile the whole loop as one program.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")

    def step(carry, _):
        params, state = carry
        value, grad = jax.value_and_grad(energy)(params)
        updates, state = optimizer.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), value

    (params, _), history = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params, history


def _is_field(leaf) -> bool:
    shape = jnp.shape(leaf)
    return len(shape) >= 2 and shape[-1] == len(shape) - 1


def smooth_updates(sigma) -> optax.GradientTransformation:
    """Gaussian smoothing (``sigma`` in voxels) of every vector-field leaf ``(*spatial, d)``
    of the updates; other leaves pass through. Chain it after the optimizer, as ANTs and
    FireANTs smooth the update field of a dense transform."""
    _checks.check_nonnegative(sigma, name="sigma")

    def update(updates, state, params=None):
        del params
        smoothed = jax.tree_util.tree_map(
            lambda u: gaussian_smooth(u, sigma, ndim=u.ndim - 1) if _is_field(u) and sigma > 0 else u, updates
        )
        return smoothed, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def cap_step(max_norm: float) -> optax.GradientTransformation:
    """Scale each vector of every field leaf so that no voxel moves more than ``max_norm``
    (in the field's units) in one step; other leaves pass through."""
    _checks.check_positive(max_norm, name="max_norm")

    def cap(u):
        if not _is_field(u):
            return u
        norm = jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True) + 1e-12)
        return u * jnp.minimum(1.0, max_norm / norm)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(cap, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------- pyramids


def _check_shrink(shrink: Sequence[int]) -> tuple[int, ...]:
    if not shrink or any(int(f) != f or f < 1 for f in shrink):
        raise ValueError(f"shrink factors must be positive integers, coarse to fine; got {shrink}")
    return tuple(int(f) for f in shrink)


def _levels(fixed: Image, moving: Image, shrink: Sequence[int]):
    """Fixed and moving images per pyramid level, coarse to fine, as Images."""
    levels = []
    for factor in shrink:
        pairs = []
        for image in (fixed, moving):
            if factor == 1:
                pairs.append(image)
            else:
                pairs.append(pyramid(image.data, 2, factor=int(factor), affine=image.affine, ndim=image.ndim)[0])
        levels.append(tuple(pairs))
    return levels


def _per_level(value, count: int, *, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
    if len(values) != count:
        raise ValueError(f"{name} needs one value per level ({count}); got {len(values)}")
    return values


def _check_pair(fixed, moving):
    fixed, moving = as_image(fixed), as_image(moving)
    if fixed.ndim != moving.ndim:
        raise ValueError(f"fixed is {fixed.ndim}-D and moving is {moving.ndim}-D; both must have the same rank")
    if fixed.has_channels or moving.has_channels:
        raise ValueError("register takes scalar images; pass one channel at a time")
    return fixed, moving


def _centre(grid: Grid):
    return grid.index_to_world(jnp.asarray([(n - 1) / 2.0 for n in grid.shape], jnp.float32))


# ---------------------------------------------------------------------------- stages


def register_affine(
    fixed,
    moving,
    *,
    kind: str = "affine",
    similarity_loss: Callable | None = None,
    shrink: Sequence[int] = (4, 2, 1),
    steps=100,
    learning_rate: float = 0.01,
    optimizer: optax.GradientTransformation | None = None,
    initial: Affine | None = None,
):
    """Affine stage (``kind``: translation, rigid, similarity, affine) over a pyramid.

    Parameters act about the centre of the fixed image; translations are scaled to the
    field of view so that one learning rate suits every parameter. ``optimizer`` defaults
    to ``optax.adam(learning_rate)``. Returns ``(Affine, losses)``.
    """
    fixed, moving = _check_pair(fixed, moving)
    shrink = _check_shrink(shrink)
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    ndim = fixed.ndim
    similarity_loss = similarity.ncc() if similarity_loss is None else similarity_loss
    steps = _per_level(steps, len(shrink), name="steps")
    count = affine_param_count(kind, ndim)
    centre = _centre(fixed.grid)
    extent = jnp.max(jnp.asarray(fixed.grid.spacing) * jnp.asarray(fixed.grid.shape, jnp.float32))
    base = Affine.identity(ndim) if initial is None else initial

    def to_affine(params):
        scaled = params.at[-ndim:].multiply(extent)
        return compose(base, Affine.from_params(scaled, kind=kind, ndim=ndim, center=centre))

    params = jnp.zeros(count, jnp.float32)
    histories = []
    for (fixed_level, moving_level), n in zip(_levels(fixed, moving, shrink), steps):

        def energy(p, fixed_level=fixed_level, moving_level=moving_level):
            return similarity_loss(warp(moving_level, to_affine(p), fixed_level.grid).data, fixed_level.data)

        params, history = jax.jit(lambda p, e=energy, n=n: minimize(e, p, optimizer, steps=n))(params)
        histories.append(history)
    return to_affine(params), tuple(histories)


def register_svf(
    fixed,
    moving,
    *,
    initial: Transform | None = None,
    similarity_loss: Callable | None = None,
    regularization: float = 1.0,
    shrink: Sequence[int] = (4, 2, 1),
    steps=(100, 60, 30),
    learning_rate: float = 0.5,
    optimizer: optax.GradientTransformation | None = None,
    smoothing: float = 1.0,
    squarings: int = 6,
):
    """Diffeomorphic stage: a stationary velocity field on the fixed grid, over a pyramid.

    The energy is ``similarity(moving o initial o exp(v), fixed) + regularization *
    diffusion(v)`` (``initial``, e.g. an affine, maps fixed to moving world space first).
    The optimizer (default ``optax.adam(learning_rate)``) is followed by Gaussian
    smoothing of its updates by ``smoothing`` voxels. Returns ``(Velocity, losses)``;
    ``exp(-v)`` is its exact inverse.
    """
    fixed, moving = _check_pair(fixed, moving)
    shrink = _check_shrink(shrink)
    similarity_loss = similarity.lncc(radius=2) if similarity_loss is None else similarity_loss
    diffusion = regularizers.diffusion()
    steps = _per_level(steps, len(shrink), name="steps")
    optimizer = optax.chain(optax.adam(learning_rate) if optimizer is None else optimizer, smooth_updates(smoothing))
    field, grid = None, None
    histories = []
    for (fixed_level, moving_level), n in zip(_levels(fixed, moving, shrink), steps):
        level_grid = fixed_level.grid
        if field is None:
            field = jnp.zeros(level_grid.shape + (level_grid.ndim,), jnp.float32)
        else:
            field = Displacement(field, grid.affine).displacement_at(level_grid.points())
        grid = level_grid

        def energy(v, fixed_level=fixed_level, moving_level=moving_level):
            velocity = Velocity(v, fixed_level.affine, steps=squarings)
            transform = velocity if initial is None else compose(initial, velocity)
            warped = warp(moving_level, transform, fixed_level.grid).data
            return similarity_loss(warped, fixed_level.data) + regularization * diffusion(v, fixed_level.grid)

        field, history = jax.jit(lambda v, e=energy, n=n: minimize(e, v, optimizer, steps=n))(field)
        histories.append(history)
    return Velocity(field, grid.affine, steps=squarings), tuple(histories)


def register(
    fixed,
    moving,
    *,
    affine: str | None = "affine",
    deformable: str | None = "svf",
    affine_options: dict | None = None,
    deformable_options: dict | None = None,
) -> Result:
    """Register ``moving`` to ``fixed``: an affine stage, then an SVF refinement.

    ``affine`` is an affine kind or None; ``deformable`` is ``"svf"`` or None. Options are
    passed to :func:`register_affine` / :func:`register_svf`. The result's transform maps
    fixed world points to moving world points; ``result.warped`` is ``moving`` on the
    fixed grid.
    """
    fixed, moving = _check_pair(fixed, moving)
    if deformable not in ("svf", None):
        raise ValueError(f"deformable must be 'svf' or None; got {deformable!r} (greedy, SyN and B-spline are not built yet)")
    losses: tuple = ()
    transform: Transform = Affine.identity(fixed.ndim)
    inverse: Transform | None = transform
    if affine is not None:
        transform, affine_losses = register_affine(fixed, moving, kind=affine, **(affine_options or {}))
        inverse = transform.inverse()
        losses += affine_losses
    if deformable == "svf":
        velocity, svf_losses = register_svf(fixed, moving, initial=transform, **(deformable_options or {}))
        inverse = compose(velocity.inverse(), inverse)
        transform = compose(transform, velocity)
        losses += svf_losses
    return Result(transform, inverse, warp(moving, transform, fixed.grid), losses)
