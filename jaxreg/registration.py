"""Classical registration: minimise ``similarity(warp(moving, T), fixed) + lambda * reg(T)``.

The pieces, each usable alone:

- :func:`minimize` runs any optax optimizer on any energy inside one jitted loop
  (``lax.scan``, or ``lax.while_loop`` with a convergence test) and returns the
  parameters and the loss history;
- :func:`smooth_updates` and :func:`cap_step` are the registration tricks as optax
  transforms that chain (Gaussian smoothing of a dense update, ANTs/FireANTs style; a
  per-voxel bound on the step);
- one function per stage, each over an image pyramid, coarse to fine, one compiled
  program per level: :func:`register_affine` (translation/rigid/similarity/affine),
  :func:`register_svf` (stationary velocity field), :func:`register_syn` (symmetric:
  both images meet half way, exact inverse), :func:`register_greedy` (compositive dense
  updates) and :func:`register_bspline` (free-form deformation);
- :func:`register` chains a linear stage and a deformable one into a :class:`Result`,
  with :data:`PRESETS` for common cases.

Every stage takes an optional ``fixed_mask`` (weights of the similarity on the fixed
grid) and ``landmarks=(fixed_points, moving_points)`` in world coordinates, whose mean
squared distance after the transform (mm^2) is added with ``landmark_weight``.

Everything is a pure function of arrays, so ``jax.vmap`` of a stage, or of
:func:`register`, over a batch of same-shape pairs works as it is (see
:mod:`jaxreg.population`).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg import _checks, _programs
from jaxreg.filters import gaussian_smooth, pyramid
from jaxreg.grid import Grid, Image, as_image
from jaxreg.losses import regularizers, similarity
from jaxreg.transforms import (
    Affine,
    BSpline,
    Displacement,
    Transform,
    Velocity,
    affine_param_count,
    compose,
    invert,
    warp,
)

__all__ = [
    "Result",
    "PRESETS",
    "minimize",
    "smooth_updates",
    "cap_step",
    "register_affine",
    "register_svf",
    "register_syn",
    "register_greedy",
    "register_bspline",
    "register",
    "normalize_intensity",
]


class Result(NamedTuple):
    """What a registration returns: ``transform`` maps fixed world points to moving ones.

    ``losses`` holds one energy history per pyramid level (coarse to fine, NaN after a
    convergence stop), ``stages`` names each level (``"svf@2"``: SVF stage at shrink 2).
    ``compile_seconds`` and ``run_seconds`` are None when the call was traced (under
    ``jit`` or ``vmap``), where nothing can be timed.

    A pytree whose leaves are the arrays (and the timings); ``stages`` is static data of
    the tree's structure, so a Result can leave ``jax.jit`` and ``jax.vmap``.
    """

    transform: Transform
    inverse: Transform | None
    warped: Image
    losses: tuple
    stages: tuple = ()
    compile_seconds: float | None = None
    run_seconds: float | None = None


_RESULT_LEAVES = ("transform", "inverse", "warped", "losses", "compile_seconds", "run_seconds")


def _flatten_result(result: Result):
    children = tuple((jax.tree_util.GetAttrKey(name), getattr(result, name)) for name in _RESULT_LEAVES)
    return children, result.stages


def _unflatten_result(stages, children) -> Result:
    return Result(**dict(zip(_RESULT_LEAVES, children)), stages=stages)


# Registered explicitly, this NamedTuple is no longer flattened field by field: the stage
# names (strings, not JAX types) become static data instead of leaves.
jax.tree_util.register_pytree_with_keys(Result, _flatten_result, _unflatten_result)


# ------------------------------------------------------------------------- optimisation


def _converged(history, i, window: int, tolerance: float):
    """True when the best energy of the last ``window`` steps improves on the best before
    them by less than ``tolerance`` times its size (ANTs' convergence window, without the
    line fit)."""
    index = jnp.arange(history.shape[0])
    recent = (index >= i - window) & (index < i)
    earlier = index < i - window
    best_recent = jnp.min(jnp.where(recent, history, jnp.inf))
    best_earlier = jnp.min(jnp.where(earlier, history, jnp.inf))
    improvement = best_earlier - best_recent
    return (i >= 2 * window) & (improvement <= tolerance * jnp.abs(best_earlier))


def minimize(
    energy: Callable,
    params,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    tolerance: float | None = None,
    window: int = 10,
    apply: Callable | None = None,
):
    """Minimise ``energy(params)`` with ``optimizer`` for at most ``steps`` steps.

    Returns ``(params, history)``; ``history[i]`` is the energy before step ``i``. With
    ``tolerance`` the loop stops once the best energy of the last ``window`` steps beats
    the best before them by less than ``tolerance`` (relative); the rest of ``history`` is
    NaN. ``apply(params, updates)`` replaces ``optax.apply_updates`` (a compositive update,
    say). Optimizers that take extra arguments (``optax.lbfgs``, with its line search) get
    ``value``, ``grad`` and ``value_fn=energy``. One ``lax.scan`` (or ``lax.while_loop``): jit the caller to compile it whole.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    apply = optax.apply_updates if apply is None else apply

    # Line-search optimizers (optax.lbfgs) take the energy itself as an extra argument.
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def step(params, state):
        value, grad = jax.value_and_grad(energy)(params)
        if extra_args:
            updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=energy)
        else:
            updates, state = optimizer.update(grad, state, params)
        return apply(params, updates), state, value

    if tolerance is None:

        def scan_step(carry, _):
            params, state, value = step(*carry)
            return (params, state), value

        (params, _), history = jax.lax.scan(scan_step, (params, optimizer.init(params)), None, length=steps)
        return params, history

    _checks.check_nonnegative(tolerance, name="tolerance")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")

    def cond(carry):
        i, _, _, history = carry
        return (i < steps) & ~_converged(history, i, window, tolerance)

    def body(carry):
        i, params, state, history = carry
        params, state, value = step(params, state)
        return i + 1, params, state, history.at[i].set(value)

    history = jnp.full((steps,), jnp.nan, jnp.float32)
    _, params, _, history = jax.lax.while_loop(cond, body, (0, params, optimizer.init(params), history))
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


class _Clock:
    """What the pyramid levels report to :func:`register`: each level's name, and the
    compile and run seconds summed over the levels that ran eagerly; and what the stages
    of one call share: its downsampled images."""

    def __init__(self):
        self.stages: list[str] = []
        self.compile_seconds = 0.0
        self.run_seconds = 0.0
        self.traced = False
        # The call's downsampled images (see _downsampled), so that its affine and
        # deformable stages share their pyramid levels.
        self.levels: dict = {}

    def result_fields(self) -> dict:
        timings = (None, None) if self.traced else (self.compile_seconds, self.run_seconds)
        return dict(stages=tuple(self.stages), compile_seconds=timings[0], run_seconds=timings[1])


def _run_level(fn: Callable, args: tuple, clock: _Clock | None, *, voxels: int):
    """``jax.jit(fn)(*args)``, compiled ahead of time when ``args`` are concrete so that
    compiling and running are timed apart, and kept for the next call of an equal level
    (:mod:`jaxreg._programs`). ``voxels``: the level's size, which decides how it is
    compiled (:func:`jaxreg._programs.compiles_fast`)."""
    if clock is None or _programs.traced(args):
        if clock is not None:
            clock.traced = True
        return jax.jit(fn)(*args)
    start = time.perf_counter()
    compiled, _ = _programs.compiled(fn, args, fast_compile=_programs.compiles_fast(voxels))
    compiled_at = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    clock.compile_seconds += compiled_at - start
    clock.run_seconds += time.perf_counter() - compiled_at
    return out


def _check_shrink(shrink: Sequence[int]) -> tuple[int, ...]:
    if not shrink or any(int(f) != f or f < 1 for f in shrink):
        raise ValueError(f"shrink factors must be positive integers, coarse to fine; got {shrink}")
    return tuple(int(f) for f in shrink)


def _pyramid_level(image: Image, factor: int) -> Image:
    return pyramid(image, 2, factor=factor)[0]


def _shrunk(image: Image, factor: int) -> Image:
    return _programs.run(functools.partial(_pyramid_level, factor=factor), (image,), voxels=image.data.size)


def _downsampled(image: Image | None, factor: int, levels: dict | None = None) -> Image | None:
    """``image`` shrunk by ``factor``; with ``levels``, computed once per image and factor.
    ``levels`` is keyed by the id of the full-size data and keeps that data, so the id
    stays its own while the entry lives."""
    if image is None or factor == 1:
        return image
    key = (id(image.data), factor)
    if levels is not None and key in levels:
        return levels[key][1]
    shrunk = _shrunk(Image(jnp.asarray(image.data, jnp.float32), jnp.asarray(image.affine, jnp.float32)), factor)
    if levels is not None:
        levels[key] = (image.data, shrunk)
    return shrunk


def _per_level(value, count: int, *, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
    if len(values) != count:
        raise ValueError(f"{name} needs one value per level ({count}); got {len(values)}")
    return values


def _check_pair(fixed, moving, *, constant: bool = False):
    """Same rank, scalar, real, no NaN/Inf voxels (and, with ``constant``, not one value
    everywhere); the value checks are eager only, skipped on tracers."""
    fixed, moving = as_image(fixed), as_image(moving)
    if fixed.ndim != moving.ndim:
        raise ValueError(
            f"fixed is {fixed.ndim}-D {fixed.shape} and moving is {moving.ndim}-D {moving.shape}; both must have the same rank"
        )
    if fixed.has_channels or moving.has_channels:
        raise ValueError(
            f"register takes scalar images; pass one channel at a time (fixed {fixed.shape}, moving {moving.shape})"
        )
    for name, image in (("fixed", fixed), ("moving", moving)):
        _checks.check_real(image.data, name=name)
        _checks.check_image_values(image.data, name=name, constant=constant)
    return fixed, moving


def _check_mask(mask, fixed: Image) -> Image | None:
    if mask is None:
        return None
    mask = as_image(mask, ndim=fixed.ndim)
    if mask.shape != fixed.shape:
        raise ValueError(f"fixed_mask has shape {mask.shape}, the fixed image {fixed.shape}; they must match")
    if not isinstance(mask.data, jax.core.Tracer) and not bool(jnp.any(jnp.asarray(mask.data) > 0)):
        raise ValueError("fixed_mask is empty: no voxel has a positive weight")
    return Image(jnp.asarray(mask.data, jnp.float32), fixed.affine)


def _check_landmarks(landmarks, ndim: int):
    if landmarks is None:
        return None
    if len(landmarks) != 2:
        raise ValueError("landmarks must be a pair (fixed_points, moving_points)")
    fixed_points, moving_points = (jnp.asarray(p, jnp.float32) for p in landmarks)
    for name, p in (("fixed", fixed_points), ("moving", moving_points)):
        if p.ndim != 2 or p.shape[-1] != ndim or p.shape[0] == 0:
            raise ValueError(f"{name} landmarks must be a non-empty (N, {ndim}) array; got shape {p.shape}")
    if fixed_points.shape != moving_points.shape:
        raise ValueError(f"fixed and moving landmarks differ in count: {fixed_points.shape} vs {moving_points.shape}")
    return fixed_points, moving_points


def normalize_intensity(image: Image, *, low: float = 0.5, high: float = 99.5) -> Image:
    """Map the ``low``..``high`` percentiles of ``image`` to 0..1, clipping beyond (ANTs
    winsorizes and rescales the same way before registering).

    LNCC, NCC and MI regularise with absolute constants (``eps``, histogram ranges); on a
    scanner's raw scale (thousands) LNCC otherwise fits background noise.
    """
    data = image.data
    stride = max(1, data.size // _PERCENTILE_SAMPLE)
    if isinstance(data, jax.core.Tracer):
        bounds = jnp.percentile(jnp.asarray(data, jnp.float32).reshape(-1)[::stride], jnp.asarray([low, high]))
    else:
        # On the host, numpy's selection finds them without sorting: 0.3 s -> 0.02 s for
        # a 160x192x224 volume.
        sample = np.asarray(data).reshape(-1)[::stride].astype(np.float32)
        bounds = np.percentile(sample, [low, high]).astype(np.float32)
    return Image(_rescaled(data, bounds), image.affine)


# Percentiles of a strided sample of about a million voxels: a full sort of a
# 160x192x224 volume took 1.4 s per image on CPU, the sample's 0.1 s, and moves the
# 0.5/99.5 percentiles of a brain MRI by well under 1% of the range.
_PERCENTILE_SAMPLE = 2**20


@jax.jit
def _rescaled(data, bounds):
    data = data.astype(jnp.float32)  # here, not eagerly: one program fewer to compile
    lo, hi = bounds[0], bounds[1]
    span = jnp.where(hi > lo, hi - lo, 1.0)
    return jnp.clip((data - lo) / span, 0.0, 1.0)


def _centre(grid: Grid):
    return grid.index_to_world(jnp.asarray([(n - 1) / 2.0 for n in grid.shape], jnp.float32))


# The few small array operations around the level programs are compiled as one program
# each, rather than dispatched eagerly: every eager operation is a program of its own, and
# their compiling (about 50 of them, 30 ms each) was a quarter of a first 2-D register.


@jax.jit
def _affine_frame(grid: Grid):
    """The fixed image's centre and the largest extent of its field of view (world)."""
    return _centre(grid), jnp.max(grid.spacing * jnp.asarray(grid.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames="kind")
def _affine_from_params(params, base: Affine, frame, *, kind: str) -> Affine:
    """``base`` followed by the stage's parameters, whose translations are in units of the
    field of view and whose linear part acts about the centre (:func:`register_affine`)."""
    centre, extent = frame
    ndim = base.ndim
    scaled = params.at[-ndim:].multiply(extent)
    return compose(base, Affine.from_params(scaled, kind=kind, ndim=ndim, center=centre))


_inverse_compiled = jax.jit(lambda transform: transform.inverse())


def _similarity(value, default: Callable) -> Callable:
    if value is None:
        return default
    if isinstance(value, str):
        if value not in similarity.SIMILARITIES:
            raise ValueError(f"unknown similarity {value!r}; choose from {sorted(similarity.SIMILARITIES)}")
        return similarity.SIMILARITIES[value]()
    if not callable(value):
        raise TypeError(f"similarity must be a name or a callable f(warped, fixed, mask=None); got {value!r}")
    return value


class _Context(NamedTuple):
    """What a level's energy needs besides the images: traced, not baked into the program."""

    initial: Transform | None
    landmarks: tuple | None


def _landmark_term(transform: Transform, context: _Context):
    if context.landmarks is None:
        return 0.0
    fixed_points, moving_points = context.landmarks
    return jnp.mean(jnp.sum((transform(fixed_points) - moving_points) ** 2, axis=-1))


def _then(context: _Context, transform: Transform) -> Transform:
    return transform if context.initial is None else compose(context.initial, transform)


def _pyramid_stage(
    fixed: Image,
    moving: Image,
    *,
    name: str,
    shrink,
    steps,
    fixed_mask,
    context: _Context,
    initial_params: Callable,
    energy: Callable,
    optimizer: optax.GradientTransformation,
    apply: Callable | None = None,
    tolerance: float | None,
    clock: _Clock | None,
    progress: Callable | None,
):
    """Run one stage over the pyramid. ``initial_params(previous, previous_grid, grid)``
    gives each level's starting point; ``energy(params, fixed, moving, mask, context)`` is
    the level's energy; ``apply(grid)`` may replace the additive update. Returns the
    parameters, the loss history of each level and the finest level's grid."""
    shrink = _check_shrink(shrink)
    steps = _per_level(steps, len(shrink), name="steps")
    params, previous_grid = None, None
    histories = []
    for level, (factor, n) in enumerate(zip(shrink, steps)):
        levels = None if clock is None else clock.levels
        fixed_level, moving_level = _downsampled(fixed, factor, levels), _downsampled(moving, factor, levels)
        mask_level = None if fixed_mask is None else _downsampled(fixed_mask, factor, levels).data
        params = initial_params(params, previous_grid, fixed_level.grid)
        previous_grid = fixed_level.grid

        def run(params, fixed_level, moving_level, mask_level, context, n=n):
            def level_energy(p):
                return energy(p, fixed_level, moving_level, mask_level, context)

            level_apply = None if apply is None else apply(fixed_level.grid)
            return minimize(level_energy, params, optimizer, steps=n, tolerance=tolerance, apply=level_apply)

        args = (params, fixed_level, moving_level, mask_level, context)
        params, history = _run_level(run, args, clock, voxels=math.prod(fixed_level.shape))
        histories.append(history)
        if clock is not None:
            clock.stages.append(f"{name}@{factor}")
        if progress is not None:
            progress(name, level + 1, len(shrink))
    return params, tuple(histories), previous_grid


def _field_at(field, old_grid: Grid, new_grid: Grid):
    return Displacement(field, old_grid.affine).displacement_at(new_grid.points())


def _exp(v, affine, steps: int, exact_gradient: bool) -> Displacement:
    """``exp(v)`` as a Displacement on v's grid. Without ``exact_gradient`` the gradient
    of anything downstream reaches ``v`` as if ``exp`` were the identity (the log-domain
    demons update, first order in ``v``): differentiating through scaling and squaring
    transposes each squaring's gather into a scatter, 10x the cost of the forward pass on
    CPU, and the smoothed update hardly changes."""
    displacement = Velocity(v, affine, steps=steps).exp()
    if exact_gradient:
        return displacement
    return Displacement(v + jax.lax.stop_gradient(displacement.field - v), displacement.affine)


def _dense_initial(previous, previous_grid: Grid | None, grid: Grid):
    if previous is None:
        return np.zeros(grid.shape + (grid.ndim,), np.float32)
    return _programs.run(_field_at, (previous, previous_grid, grid), voxels=math.prod(grid.shape))


# ---------------------------------------------------------------------------- stages


def register_affine(
    fixed,
    moving,
    *,
    kind: str = "affine",
    similarity_loss: Callable | str | None = None,
    shrink: Sequence[int] = (4, 2, 1),
    steps=100,
    learning_rate: float = 0.01,
    optimizer: optax.GradientTransformation | None = None,
    initial: Affine | None = None,
    fixed_mask=None,
    landmarks=None,
    landmark_weight: float = 0.01,
    tolerance: float | None = None,
    progress: Callable | None = None,
    _clock: _Clock | None = None,
):
    """Affine stage (``kind``: translation, rigid, similarity, affine) over a pyramid.

    Parameters act about the centre of the fixed image; translations are scaled to the
    field of view so that one learning rate suits every parameter. ``similarity_loss``
    defaults to NCC and ``optimizer`` to ``optax.adam(learning_rate)``. Returns
    ``(Affine, losses)``.
    """
    fixed, moving = _check_pair(fixed, moving)
    fixed_mask = _check_mask(fixed_mask, fixed)
    similarity_loss = _similarity(similarity_loss, similarity.ncc())
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    ndim = fixed.ndim
    count = affine_param_count(kind, ndim)
    frame = _affine_frame(fixed.grid)
    base = Affine.identity(ndim) if initial is None else initial
    context = _Context(base, _check_landmarks(landmarks, ndim))

    def to_affine(params, base):
        return _affine_from_params(params, base, frame, kind=kind)

    def energy(params, fixed_level, moving_level, mask, context):
        transform = to_affine(params, context.initial)
        warped = warp(moving_level, transform, fixed_level.grid).data
        return similarity_loss(warped, fixed_level.data, mask=mask) + landmark_weight * _landmark_term(transform, context)

    params, losses, _ = _pyramid_stage(
        fixed,
        moving,
        name=kind,
        context=context,
        initial_params=lambda p, g0, g: np.zeros(count, np.float32) if p is None else p,
        energy=energy,
        optimizer=optimizer,
        **_level_options(shrink, steps, fixed_mask, tolerance, _clock, progress),
    )
    return to_affine(params, base), losses


def _dense_stage_common(fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer, learning_rate, smoothing):
    fixed, moving = _check_pair(fixed, moving)
    fixed_mask = _check_mask(fixed_mask, fixed)
    similarity_loss = _similarity(similarity_loss, similarity.lncc(radius=2))
    optimizer = optax.chain(optax.adam(learning_rate) if optimizer is None else optimizer, smooth_updates(smoothing))
    return fixed, moving, fixed_mask, _check_landmarks(landmarks, fixed.ndim), similarity_loss, optimizer


def _level_options(shrink, steps, fixed_mask, tolerance, clock, progress) -> dict:
    """The settings every stage hands to :func:`_pyramid_stage` unchanged."""
    return dict(shrink=shrink, steps=steps, fixed_mask=fixed_mask, tolerance=tolerance, clock=clock, progress=progress)


def register_svf(
    fixed,
    moving,
    *,
    initial: Transform | None = None,
    similarity_loss: Callable | str | None = None,
    regularization: float = 1.0,
    shrink: Sequence[int] = (4, 2, 1),
    steps=(100, 60, 30),
    learning_rate: float = 0.5,
    optimizer: optax.GradientTransformation | None = None,
    smoothing: float = 1.0,
    squarings: int = 6,
    exact_gradient: bool = False,
    fixed_mask=None,
    landmarks=None,
    landmark_weight: float = 0.01,
    tolerance: float | None = None,
    progress: Callable | None = None,
    _clock: _Clock | None = None,
):
    """Diffeomorphic stage: a stationary velocity field on the fixed grid, over a pyramid.

    The energy is ``similarity(moving o initial o exp(v), fixed) + regularization *
    diffusion(v)`` (``initial``, e.g. an affine, maps fixed to moving world space first).
    The optimizer (default ``optax.adam(learning_rate)``, in mm per step) is followed by
    Gaussian smoothing of its updates by ``smoothing`` voxels. The gradient reaches ``v``
    as if ``exp`` were the identity unless ``exact_gradient`` (see :func:`_exp`). Returns
    ``(Velocity, losses)``; ``exp(-v)`` is its exact inverse.
    """
    fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer = _dense_stage_common(
        fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer, learning_rate, smoothing
    )
    level_options = _level_options(shrink, steps, fixed_mask, tolerance, _clock, progress)
    diffusion = regularizers.diffusion()

    def energy(v, fixed_level, moving_level, mask, context):
        transform = _then(context, _exp(v, fixed_level.affine, squarings, exact_gradient))
        warped = warp(moving_level, transform, fixed_level.grid).data
        value = similarity_loss(warped, fixed_level.data, mask=mask) + regularization * diffusion(v, fixed_level.grid)
        return value + landmark_weight * _landmark_term(transform, context)

    field, losses, grid = _pyramid_stage(
        fixed, moving, name="svf", context=_Context(initial, landmarks), initial_params=_dense_initial,
        energy=energy, optimizer=optimizer, **level_options,
    )
    return Velocity(field, grid.affine, steps=squarings), losses


def register_syn(
    fixed,
    moving,
    *,
    initial: Transform | None = None,
    similarity_loss: Callable | str | None = None,
    regularization: float = 1.0,
    shrink: Sequence[int] = (4, 2, 1),
    steps=(100, 60, 30),
    learning_rate: float = 0.5,
    optimizer: optax.GradientTransformation | None = None,
    smoothing: float = 1.0,
    squarings: int = 6,
    exact_gradient: bool = False,
    fixed_mask=None,
    landmarks=None,
    landmark_weight: float = 0.01,
    tolerance: float | None = None,
    progress: Callable | None = None,
    _clock: _Clock | None = None,
):
    """Symmetric stage: both images move half way and meet in the middle (SyN's idea).

    One velocity field ``v`` on the fixed grid; the energy compares ``moving o initial o
    exp(v/2)`` with ``fixed o exp(-v/2)``, so neither image is privileged, and the
    transform is ``initial o exp(v)`` with the exact inverse ``exp(-v) o initial^-1``.
    ANTs' SyN keeps two greedy fields and their numerical inverses; one log-domain field
    gives the same symmetry with an inverse that needs no iteration. Returns ``(Velocity,
    losses)``; ``fixed_mask`` weighs the similarity where the fixed image lands.
    """
    fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer = _dense_stage_common(
        fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer, learning_rate, smoothing
    )
    level_options = _level_options(shrink, steps, fixed_mask, tolerance, _clock, progress)
    diffusion = regularizers.diffusion()

    def energy(v, fixed_level, moving_level, mask, context):
        grid = fixed_level.grid
        forward = _exp(0.5 * v, fixed_level.affine, squarings - 1, exact_gradient)
        backward = _exp(-0.5 * v, fixed_level.affine, squarings - 1, exact_gradient)
        moving_half = warp(moving_level, _then(context, forward), grid).data
        fixed_half = warp(fixed_level, backward, grid).data
        if mask is not None:
            mask = warp(Image(mask, fixed_level.affine), backward, grid).data
        value = similarity_loss(moving_half, fixed_half, mask=mask) + regularization * diffusion(v, grid)
        if context.landmarks is not None:
            value = value + landmark_weight * _landmark_term(_then(context, compose(forward, forward)), context)
        return value

    field, losses, grid = _pyramid_stage(
        fixed, moving, name="syn", context=_Context(initial, landmarks), initial_params=_dense_initial,
        energy=energy, optimizer=optimizer, **level_options,
    )
    return Velocity(field, grid.affine, steps=squarings), losses


def register_greedy(
    fixed,
    moving,
    *,
    initial: Transform | None = None,
    similarity_loss: Callable | str | None = None,
    regularization: float = 0.0,
    shrink: Sequence[int] = (4, 2, 1),
    steps=(100, 60, 30),
    learning_rate: float = 0.5,
    optimizer: optax.GradientTransformation | None = None,
    smoothing: float = 1.0,
    field_smoothing: float = 0.5,
    fixed_mask=None,
    landmarks=None,
    landmark_weight: float = 0.01,
    tolerance: float | None = None,
    progress: Callable | None = None,
    _clock: _Clock | None = None,
):
    """Greedy compositive stage (ANTs' greedy SyN half, FireANTs' greedy): a displacement
    ``u`` on the fixed grid, updated by composition ``phi <- phi o (id + step)``.

    Each step smooths the optimizer's update by ``smoothing`` voxels (the fluid-like
    regularization), composes it, then smooths the whole field by ``field_smoothing``
    voxels (the elastic-like one); ``regularization`` adds ``diffusion(u)`` to the energy.
    Large deformations stay cheap, but nothing guarantees invertibility: check the
    Jacobian. Returns ``(Displacement, losses)``.
    """
    fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer = _dense_stage_common(
        fixed, moving, fixed_mask, landmarks, similarity_loss, optimizer, learning_rate, smoothing
    )
    level_options = _level_options(shrink, steps, fixed_mask, tolerance, _clock, progress)
    _checks.check_nonnegative(field_smoothing, name="field_smoothing")
    diffusion = regularizers.diffusion()

    def energy(u, fixed_level, moving_level, mask, context):
        transform = _then(context, Displacement(u, fixed_level.affine))
        warped = warp(moving_level, transform, fixed_level.grid).data
        value = similarity_loss(warped, fixed_level.data, mask=mask)
        if regularization:
            value = value + regularization * diffusion(u, fixed_level.grid)
        return value + landmark_weight * _landmark_term(transform, context)

    def compositive(grid: Grid):
        def apply(u, step):
            # (phi o (id + s))(x) = x + s(x) + u(x + s(x))
            moved = Displacement(u, grid.affine).displacement_at(grid.points() + step)
            field = step + moved
            if field_smoothing > 0:
                field = gaussian_smooth(field, field_smoothing, ndim=grid.ndim)
            return field

        return apply

    field, losses, grid = _pyramid_stage(
        fixed, moving, name="greedy", context=_Context(initial, landmarks), initial_params=_dense_initial,
        energy=energy, optimizer=optimizer, apply=compositive, **level_options,
    )
    return Displacement(field, grid.affine), losses


def register_bspline(
    fixed,
    moving,
    *,
    initial: Transform | None = None,
    similarity_loss: Callable | str | None = None,
    regularization: float = 0.1,
    control_spacing=None,
    shrink: Sequence[int] = (4, 2, 1),
    steps=(100, 60, 30),
    learning_rate: float = 0.2,
    optimizer: optax.GradientTransformation | None = None,
    fixed_mask=None,
    landmarks=None,
    landmark_weight: float = 0.01,
    tolerance: float | None = None,
    progress: Callable | None = None,
    _clock: _Clock | None = None,
):
    """Free-form deformation: cubic B-spline coefficients every ``control_spacing`` mm
    (default 5 voxels of the fixed image) on one control grid shared by all levels.

    The energy is ``similarity + regularization * bending(coefficients)``, the bending
    energy of the coefficient field on the control grid (the spline's own bending energy
    up to a constant factor, at a fraction of the cost). Returns ``(BSpline, losses)``.
    """
    fixed, moving = _check_pair(fixed, moving)
    fixed_mask = _check_mask(fixed_mask, fixed)
    similarity_loss = _similarity(similarity_loss, similarity.lncc(radius=2))
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    if control_spacing is None:
        control_spacing = tuple(5.0 * s for s in fixed.grid.spacing)
    control = BSpline.control_grid(fixed.grid, control_spacing)
    bending = regularizers.bending()

    def energy(coefficients, fixed_level, moving_level, mask, context):
        spline = BSpline(coefficients, control.affine)
        # Every level's grid is the fixed grid downsampled: its axes run along the control
        # grid's, so the spline is evaluated there by separable products, not per point.
        warped = warp(moving_level, _then(context, spline.on_parallel_grid(fixed_level.grid)), fixed_level.grid).data
        value = similarity_loss(warped, fixed_level.data, mask=mask) + regularization * bending(coefficients, control)
        return value + landmark_weight * _landmark_term(_then(context, spline), context)

    coefficients, losses, _ = _pyramid_stage(
        fixed,
        moving,
        name="bspline",
        context=_Context(initial, _check_landmarks(landmarks, fixed.ndim)),
        initial_params=lambda p, g0, g: np.zeros(control.shape + (fixed.ndim,), np.float32) if p is None else p,
        energy=energy,
        optimizer=optimizer,
        **_level_options(shrink, steps, fixed_mask, tolerance, _clock, progress),
    )
    return BSpline(coefficients, control.affine), losses


# ---------------------------------------------------------------------------- presets

DEFORMABLE_STAGES = {
    "svf": register_svf,
    "syn": register_syn,
    "greedy": register_greedy,
    "bspline": register_bspline,
}

#: Named option sets for :func:`register`. Each maps to its ``affine``, ``deformable``,
#: ``similarity`` and per-stage options; explicit arguments override them.
PRESETS: dict[str, dict] = {
    # Same-modality brain MRI, skull-stripped: affine by NCC, then greedy LNCC. Like
    # ANTsPy's SyN it stops at half resolution; measured against it on OASIS in
    # benchmarks/results/pairwise.md.
    "brain-mri": dict(
        affine="affine",
        deformable="greedy",
        affine_options=dict(similarity_loss="ncc", shrink=(4, 2), steps=(100, 50)),
        deformable_options=dict(similarity_loss="lncc", shrink=(4, 2), steps=(100, 40), learning_rate=0.6),
    ),
    # brain-mri coarser and shorter: a first look in seconds.
    "fast": dict(
        affine="affine",
        deformable="svf",
        affine_options=dict(similarity_loss="ncc", shrink=(4,), steps=(80,)),
        deformable_options=dict(similarity_loss="lncc", shrink=(4, 2), steps=(80, 40)),
    ),
    # CT (Hounsfield units, large flat regions): mutual information for the affine.
    "ct": dict(
        affine="affine",
        deformable="svf",
        affine_options=dict(similarity_loss="mi", shrink=(4, 2), steps=(100, 50)),
        deformable_options=dict(similarity_loss="lncc", shrink=(4, 2, 1), steps=(80, 40, 20), regularization=2.0),
    ),
    # Different contrasts (T1 to T2, MR to CT): MI for the affine, MIND for the deformable.
    "multimodal": dict(
        affine="affine",
        deformable="svf",
        affine_options=dict(similarity_loss="mi", shrink=(4, 2), steps=(100, 50)),
        deformable_options=dict(similarity_loss="mind", shrink=(4, 2), steps=(80, 40), regularization=2.0),
    ),
    "rigid": dict(affine="rigid", deformable=None, affine_options=dict(similarity_loss="ncc", shrink=(4, 2, 1), steps=(100, 50, 25))),
    "affine": dict(affine="affine", deformable=None, affine_options=dict(similarity_loss="ncc", shrink=(4, 2, 1), steps=(100, 50, 25))),
}

# brain-mri with a last level at full resolution: slower, more accurate. On the OASIS pair
# (160x192x224, 2 cores) Dice 0.783 / 0.793 against brain-mri's 0.740 / 0.738, in about 33
# against 9 s, no folds (benchmarks/results/pairwise-fine.md).
PRESETS["brain-mri-fine"] = dict(
    PRESETS["brain-mri"],
    affine_options=dict(PRESETS["brain-mri"]["affine_options"]),
    deformable_options=dict(PRESETS["brain-mri"]["deformable_options"], shrink=(4, 2, 1), steps=(100, 40, 20)),
)

_UNSET = object()

def _invert_on(transform: Transform, grid: Grid) -> Displacement:
    return invert(transform, grid=grid)


def _invert_spline_on(spline: BSpline, grid: Grid) -> Displacement:
    # Inverting the spline sampled on the grid (and interpolated linearly between voxels)
    # instead of the spline itself: on a 48x48 test the round trip's error grew from 0.041 to
    # 0.063 voxels at worst (median 0.005 to 0.009); per-point steps on the spline to refine
    # it cost 20 s each on 160x192x224.
    return invert(spline.on_parallel_grid(grid), grid=grid)


def _warp_spline(moving: Image, linear: Transform, spline: BSpline, grid: Grid) -> Image:
    return warp(moving, compose(linear, spline.on_parallel_grid(grid)), grid)


_MIN_COARSE_VOXELS = 16


def _fit_to_image(options: dict, shape) -> dict:
    """Drop a preset's pyramid levels that would leave fewer than 16 voxels along an
    axis (a 32^3 image at shrink 4 is 8^3: too coarse for a dense field to mean
    anything), with their steps; the finest level always stays."""
    if "shrink" not in options:
        return options
    shrink = _check_shrink(options["shrink"])
    steps = _per_level(options.get("steps", 0), len(shrink), name="steps")
    keep = [i for i, f in enumerate(shrink) if min(shape) / f >= _MIN_COARSE_VOXELS] or [len(shrink) - 1]
    fitted = dict(options, shrink=tuple(shrink[i] for i in keep))
    if "steps" in options:
        fitted["steps"] = tuple(steps[i] for i in keep)
    return fitted


def _steps_for(shrink, preset_shrink, preset_steps) -> tuple:
    """Steps for new shrink factors from a preset's: the preset's count at the same
    factor, else at the nearest one."""
    shrink, preset_shrink = _check_shrink(shrink), _check_shrink(preset_shrink)
    preset_steps = _per_level(preset_steps, len(preset_shrink), name="steps")
    by_factor = dict(zip(preset_shrink, preset_steps))
    return tuple(by_factor.get(f, by_factor[min(preset_shrink, key=lambda g: abs(g - f))]) for f in shrink)


def register(
    fixed,
    moving,
    *,
    preset: str | None = None,
    affine=_UNSET,
    deformable=_UNSET,
    similarity=None,
    regularization: float | None = None,
    shrink: Sequence[int] | None = None,
    steps=None,
    fixed_mask=None,
    landmarks=None,
    normalize: bool = True,
    progress: Callable | None = None,
    affine_options: dict | None = None,
    deformable_options: dict | None = None,
) -> Result:
    """Register ``moving`` to ``fixed``: a linear stage, then a deformable one.

    ``preset`` (default ``"brain-mri"``, see :data:`PRESETS`) sets both stages; then
    ``affine`` (an affine kind or None) and ``deformable`` (``"svf"``, ``"syn"``,
    ``"greedy"``, ``"bspline"`` or None) choose the stages, and ``similarity`` (a name of
    :data:`jaxreg.losses.SIMILARITIES` or a callable), ``regularization``, ``shrink`` and
    ``steps`` override the deformable stage's settings (the affine stage's when there is
    no deformable one). A preset's pyramid levels coarser than 16 voxels along an axis
    are dropped for small images. ``*_options`` go to the stage functions last. ``progress(stage,
    done, total)`` is called after each pyramid level. With ``normalize`` (default) both
    images are registered after :func:`normalize_intensity`. The transform maps fixed
    world points to moving ones; ``result.warped`` is ``moving`` (as given) on the fixed
    grid.

    ``jax.vmap(register)`` over same-shape pairs runs every pyramid level as one batched
    program and returns one :class:`Result` with a leading pairs axis on every array
    (the checks on image values are skipped on traced images, and nothing is timed).
    """
    fixed, moving = _check_pair(fixed, moving, constant=True)
    _similarity(similarity, None)  # an unknown name fails here, not after the affine stage
    if regularization is not None:
        _checks.check_nonnegative(regularization, name="regularization")
    if shrink is not None:
        shrink = _check_shrink(shrink)
    if steps is not None:
        counts = tuple(steps) if isinstance(steps, (list, tuple)) else (steps,)
        if not counts or any(isinstance(n, bool) or int(n) != n or n < 0 for n in counts):
            raise ValueError(f"steps must be whole numbers >= 0 (one, or one per pyramid level); got {steps!r}")
    preset_name = "brain-mri" if preset is None else preset
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    chosen = PRESETS[preset_name]
    affine = chosen["affine"] if affine is _UNSET else affine
    deformable = chosen.get("deformable") if deformable is _UNSET else deformable
    if affine is not None and affine not in ("translation", "rigid", "similarity", "affine"):
        raise ValueError(f"affine must be translation, rigid, similarity, affine or None; got {affine!r}")
    if deformable is not None and deformable not in DEFORMABLE_STAGES:
        raise ValueError(f"deformable must be one of {sorted(DEFORMABLE_STAGES)} or None; got {deformable!r}")
    if affine is None and deformable is None:
        raise ValueError("nothing to do: both affine and deformable are None")

    linear_options = _fit_to_image(dict(chosen.get("affine_options", {})), fixed.shape)
    dense_options = _fit_to_image(dict(chosen.get("deformable_options", {})), fixed.shape) if deformable is not None else {}
    if deformable is not None and chosen.get("deformable") != deformable:
        # A different stage than the preset's: keep only the settings every stage shares.
        dense_options = {k: v for k, v in dense_options.items() if k in ("similarity_loss", "shrink", "steps")}
    overrides = {
        k: v
        for k, v in dict(similarity_loss=similarity, regularization=regularization, shrink=shrink, steps=steps).items()
        if v is not None
    }
    target = dense_options if deformable is not None else linear_options
    if deformable is None:
        overrides.pop("regularization", None)
    if "shrink" in overrides and "steps" not in overrides and "steps" in target:
        overrides["steps"] = _steps_for(overrides["shrink"], target.get("shrink", (4, 2, 1)), target["steps"])
    target.update(overrides)
    if "shrink" in target and isinstance(target.get("steps"), (list, tuple)):
        _per_level(target["steps"], len(target["shrink"]), name="steps")
    linear_options.update(affine_options or {})
    dense_options.update(deformable_options or {})
    original_moving = moving
    if normalize:
        fixed, moving = normalize_intensity(fixed), normalize_intensity(moving)

    clock = _Clock()
    common = dict(fixed_mask=fixed_mask, landmarks=landmarks, progress=progress, _clock=clock)
    losses: tuple = ()
    transform: Transform = Affine.identity(fixed.ndim)
    inverse: Transform | None = transform
    if affine is not None:
        transform, affine_losses = register_affine(fixed, moving, kind=affine, **common, **linear_options)
        inverse = _inverse_compiled(transform)
        losses += affine_losses
    if deformable is not None:
        stage = DEFORMABLE_STAGES[deformable]
        dense, dense_losses = stage(fixed, moving, initial=transform, **common, **dense_options)
        if isinstance(dense, Velocity):
            dense_inverse = dense.inverse()
        elif isinstance(dense, BSpline):
            # register_bspline lays its control grid on fixed.grid, so the spline is sampled
            # there separably and inverted as a dense field: 2^d taps per point and iteration
            # instead of 4^d.
            dense_inverse = _programs.run(_invert_spline_on, (dense, fixed.grid), voxels=math.prod(fixed.shape))
        else:
            grid = dense.grid if isinstance(dense, Displacement) else fixed.grid
            dense_inverse = _programs.run(_invert_on, (dense, grid), voxels=math.prod(grid.shape))
        inverse = compose(dense_inverse, inverse)
        linear, transform = transform, compose(transform, dense)
        losses += dense_losses
    # One program for the final full-resolution warp: op by op, composing the transform and
    # sampling 160x192x224 voxels took 2.0 s, most of it dispatch and unfused passes.
    if deformable is not None and isinstance(dense, BSpline):
        warped = _programs.run(_warp_spline, (original_moving, linear, dense, fixed.grid), voxels=math.prod(fixed.shape))
    else:
        warped = _programs.run(warp, (original_moving, transform, fixed.grid), voxels=math.prod(fixed.shape))
    return Result(transform, inverse, warped, losses, **clock.result_fields())
