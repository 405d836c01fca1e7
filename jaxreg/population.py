"""Many pairs at once: one registration ``vmap``-ed over a batch, sharded over devices, and
groupwise template building.

A registration stage is a pure function of its images, so a batch of same-shape pairs
is ``jax.vmap`` of the same call, compiled as one program. With several devices the
batch axis is split across them with ``jax.sharding`` (each device registers its share
of the pairs; nothing is communicated).

On a CPU, make each core a device: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(set before JAX starts), then ``register_many(..., devices=N)``. XLA CPU runs one
device's program on few threads when its arrays are small, so a vmapped batch on one
device leaves cores idle that the sharded one uses (``docs/population.md`` has the
numbers).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxreg import _checks, _programs
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Grid, Image
from jaxreg.transforms import Velocity, warp

__all__ = ["register_many", "build_template", "pair_sharding"]


def pair_sharding(devices=None) -> NamedSharding:
    """A sharding that splits axis 0 (the pairs) over ``devices`` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    return NamedSharding(Mesh(np.asarray(devices), ("pairs",)), PartitionSpec("pairs"))


def _chosen_devices(devices) -> list:
    """``devices`` as a list: an int n means the first n of ``jax.devices()``, and asking
    for more than there are is an error, not a quiet run on fewer."""
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        available = jax.devices()
        if devices < 1:
            raise ValueError(f"devices must be a positive count or a list of devices; got {devices}")
        if devices > len(available):
            platform = available[0].platform
            hint = (
                f"; to test on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax is imported"
                if platform == "cpu"
                else ""
            )
            raise ValueError(
                f"devices={devices} asks for {devices} devices but only {len(available)} {platform} "
                f"device{'s are' if len(available) > 1 else ' is'} available "
                f"({', '.join(str(d) for d in available)}){hint}"
            )
        return available[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("devices is an empty list")
    return devices


def _check_batch(batch, name: str, ndim: int | None = None):
    batch = jnp.asarray(batch)
    if batch.ndim < 3:
        raise ValueError(f"{name} must be a batch (pairs, *spatial) of 2-D or 3-D images; got shape {batch.shape}")
    if batch.shape[0] == 0:
        raise ValueError(f"{name} holds no pairs")
    return batch


def register_many(stage: Callable, fixed, moving, *, affine=None, devices=None, batch_size: int | None = None, **options):
    """Run ``stage(fixed_i, moving_i, **options)`` for every pair of a batch in one program.

    ``stage`` is any of :mod:`jaxreg.registration`'s stage functions (or a function of
    ``(fixed, moving)`` returning a pytree); ``fixed`` and ``moving`` are arrays
    ``(pairs, *spatial)`` on one grid with voxel-to-world ``affine`` (default identity).
    With ``devices`` (a list, or an int for the first n; more than ``jax.devices()`` holds
    is a ValueError), the pairs are sharded across them; the count of pairs must be a
    multiple of the device count. ``batch_size`` registers that many pairs at a time
    (``jax.lax.map``) instead of all at once: on CPU a working set that stays in cache can
    beat one large batch (``benchmarks/results/population.md``); with ``devices`` as well,
    each device registers its own share of the pairs that many at a time. The program is kept for
    the next call with equal settings and shapes (:mod:`jaxreg._programs`), so a template
    iteration does not compile again. Returns the stage's result with a leading pairs axis
    on every array.
    """
    fixed = _check_batch(fixed, "fixed")
    moving = _check_batch(moving, "moving")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} batches must have the same shape")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")
    grid = Grid(fixed.shape[1:], affine)

    def one(f, m):
        return stage(Image(f, grid.affine), Image(m, grid.affine), **options)

    def batched(f, m):
        if batch_size is None or batch_size >= f.shape[0]:
            return jax.vmap(one)(f, m)
        return jax.lax.map(lambda pair: one(*pair), (f, m), batch_size=int(batch_size))

    run = batched
    if devices is not None:
        devices = _chosen_devices(devices)
        if fixed.shape[0] % len(devices):
            raise ValueError(f"{fixed.shape[0]} pairs cannot be split evenly over {len(devices)} devices")
        device_ids = tuple(int(d.id) for d in devices)

        def sharded(f, m):
            # Each device runs the batch on its own pairs, so batch_size chunks each device's
            # share (a lax.map under jit alone would run over the whole batch, replicated).
            return jax.shard_map(batched, mesh=_pairs_mesh(device_ids), in_specs=PartitionSpec("pairs"),
                                 out_specs=PartitionSpec("pairs"), check_vma=False)(f, m)

        run = sharded

    if _programs.traced((fixed, moving)):
        return run(fixed, moving)
    if devices is not None:
        sharding = pair_sharding(devices)
        fixed, moving = jax.device_put(fixed, sharding), jax.device_put(moving, sharding)
    program, _ = _programs.compiled(run, (fixed, moving))
    return program(fixed, moving)


def _pairs_mesh(device_ids: tuple[int, ...]) -> Mesh:
    # Built from device ids inside the program, so that the closure that holds them has a
    # fingerprint and the program is kept (a Mesh of Device objects has none).
    by_id = {d.id: d for d in jax.devices()}
    return Mesh(np.asarray([by_id[i] for i in device_ids]), ("pairs",))


def _sharpen(image, amount: float, ndim: int):
    # Unsharp masking stands in for ANTs' Laplacian sharpening of the averaged template:
    # averaging blurs edges that registration has not yet aligned.
    if amount == 0:
        return image
    return image + amount * (image - gaussian_smooth(image, 1.0, ndim=ndim))


def build_template(
    images,
    *,
    stage: Callable,
    iterations: int = 4,
    affine=None,
    sharpen: float = 0.5,
    shape_update: bool = True,
    devices=None,
    callback: Callable | None = None,
    **options,
):
    """Groupwise template by ANTs' recipe: start from the mean image, then repeat
    (register every image to the template, average the warped images, sharpen, and move
    the template by the inverse of the mean transform so that it sits at the centre of
    the population).

    ``images`` is ``(n, *spatial)`` on one grid; ``stage`` a velocity-field stage
    (:func:`~jaxreg.registration.register_svf` or ``register_syn``: the mean of the
    velocities is the log-domain mean of the transforms, and ``exp(-mean)`` its exact
    inverse). Each iteration is one ``vmap``-ed program (sharded with ``devices``).
    ``callback(iteration, template)`` sees each new template. Returns ``(template
    Image, velocities (n, *spatial, d))`` of the last iteration.
    """
    images = _check_batch(images, "images")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    _checks.check_nonnegative(sharpen, name="sharpen")
    grid = Grid(images.shape[1:], affine)
    template = jnp.mean(images, axis=0)
    velocities = None
    for iteration in range(iterations):
        fixed = jnp.broadcast_to(template, images.shape)
        velocity, _ = register_many(stage, fixed, images, affine=grid.affine, devices=devices, **options)
        if not isinstance(velocity, Velocity):
            raise TypeError(f"build_template needs a stage that returns a Velocity; {stage.__name__} returned {type(velocity).__name__}")
        velocities = velocity.field
        warped = jax.vmap(lambda field, image: warp(Image(image, grid.affine), Velocity(field, velocity.affine[0], steps=velocity.steps), grid).data)(
            velocities, images
        )
        template = _sharpen(jnp.mean(warped, axis=0), sharpen, grid.ndim)
        if shape_update:
            mean_velocity = jnp.mean(velocities, axis=0)
            template = warp(Image(template, grid.affine), Velocity(-mean_velocity, velocity.affine[0], steps=velocity.steps), grid).data
        if callback is not None:
            callback(iteration, Image(template, grid.affine))
    return Image(template, grid.affine), velocities
