"""Many pairs at once: one registration ``vmap``-ed over a batch, run concurrently on a
CPU's cores or sharded over devices, and groupwise template building.

A registration stage is a pure function of its images, so a batch of same-shape pairs
is ``jax.vmap`` of the same call. On an accelerator the whole batch is one program. On a
CPU, XLA runs one program's small arrays on one core, so :func:`register_many` cuts the
batch into cache-sized chunks and runs one vmapped call per core at the same time, from
host threads (:func:`plan` says how). With several devices the batch axis is split
across them with ``jax.sharding`` (each device registers its share of the pairs;
nothing is communicated); on a CPU ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(set before JAX starts) makes each core a device. ``docs/population.md`` has the numbers.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxreg import _checks, _programs
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Grid, Image
from jaxreg.transforms import Velocity, warp

__all__ = ["register_many", "build_template", "pair_sharding", "plan"]


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


def register_many(
    stage: Callable, fixed, moving, *, affine=None, devices=None, batch_size: int | None = None, threads: int | None = None, **options
):
    """Run ``stage(fixed_i, moving_i, **options)`` for every pair of a batch.

    ``stage`` is any of :mod:`jaxreg.registration`'s stage functions (or a function of
    ``(fixed, moving)`` returning a pytree); ``fixed`` and ``moving`` are arrays
    ``(pairs, *spatial)`` on one grid with voxel-to-world ``affine`` (default identity).
    Returns the stage's result with a leading pairs axis on every array.

    How the pairs are spread over the hardware:

    - ``batch_size``: how many pairs one ``vmap``-ed call registers at once. By default
      all of them on an accelerator; on a CPU as many as keep one call's images near
      :data:`CPU_CHUNK_VOXELS` voxels (at least 1), because a large batch outgrows the cache.
    - ``threads``: how many such calls run at the same time, each on its own host thread
      (CPU only: XLA runs one call's small arrays on one core, so concurrent calls are
      what fills the others). By default the cores this process may use, at most one a
      call, and fewer where that many calls at once would take more than half the free
      memory; 1 on an accelerator. With ``threads=1`` the calls are one program, a
      ``lax.map`` over the chunks.
    - ``devices`` (a list, or an int for the first n; more than ``jax.devices()`` holds is
      a ValueError): the pairs are sharded across them, each device registering its own
      share ``batch_size`` (default: all) at a time; the count of pairs must be a multiple
      of the device count. ``threads`` does not combine with it.

    Every program is kept for the next call with equal settings and shapes
    (:mod:`jaxreg._programs`), so a template iteration does not compile again. Under an
    outer ``jax.jit`` or ``vmap`` the batch is one ``vmap`` (``lax.map`` with ``batch_size``).
    ``benchmarks/results/population.md`` measures these choices against a loop.
    """
    fixed = _check_batch(fixed, "fixed")
    moving = _check_batch(moving, "moving")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} batches must have the same shape")
    _check_count(batch_size, "batch_size")
    _check_count(threads, "threads")
    if devices is not None and threads not in (None, 1):
        raise ValueError(f"threads={threads} does not combine with devices=: the devices already register their shares at the same time")
    grid = Grid(fixed.shape[1:], affine)

    def one(f, m):
        return stage(Image(f, grid.affine), Image(m, grid.affine), **options)

    def chunked(size):
        def run(f, m):
            if size is None or size >= f.shape[0]:
                return jax.vmap(one)(f, m)
            return jax.lax.map(lambda pair: one(*pair), (f, m), batch_size=int(size))

        return run

    traced = _programs.traced((fixed, moving))
    if devices is not None:
        devices = _chosen_devices(devices)
        run = _sharded(chunked(batch_size), devices, fixed.shape[0])
        if traced:
            return run(fixed, moving)
        sharding = pair_sharding(devices)
        fixed, moving = jax.device_put(fixed, sharding), jax.device_put(moving, sharding)
        program, _ = _programs.compiled(run, (fixed, moving))
        return program(fixed, moving)

    if traced:
        return chunked(batch_size)(fixed, moving)
    batch_size, threads, chunks = plan(fixed.shape, _platform(fixed), batch_size=batch_size, threads=threads)
    if threads > 1:
        programs = {}
        for start, stop in chunks:
            if stop - start not in programs:
                programs[stop - start], _ = _programs.compiled(_chunk_at(one, stop - start), (fixed, moving, np.int32(start)))
        threads = _calls_that_fit(max(programs.values(), key=_bytes_per_call), threads)
    if threads <= 1:
        program, _ = _programs.compiled(chunked(batch_size), (fixed, moving))
        return program(fixed, moving)
    results = _run_concurrently([(programs[stop - start], (fixed, moving, np.int32(start))) for start, stop in chunks], threads)
    return jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts), *results)


def _chunk_at(one: Callable, size: int) -> Callable:
    # The chunk is cut inside the program: slicing the batch outside would cost a dispatch
    # a chunk, as much as a small pair's registration.
    def run(f, m, start):
        take = lambda batch: jax.lax.dynamic_slice_in_dim(batch, start, size)  # noqa: E731
        return jax.vmap(one)(take(f), take(m))

    return run


_pool: tuple[ThreadPoolExecutor, int] | None = None  # with its count of threads


def _run_concurrently(jobs: list, threads: int) -> list:
    """Each ``(program, args)`` of ``jobs`` run, at most ``threads`` at a time, on a pool of
    host threads kept across calls (starting threads costs more than a small chunk). Returns
    the results in the order of ``jobs``; after an error no new job starts, and it is raised."""
    global _pool
    if _pool is None or _pool[1] < threads:
        size = max(threads, _usable_cores())
        _pool = (ThreadPoolExecutor(max_workers=size, thread_name_prefix="jaxreg-pairs"), size)
    pending = iter(range(len(jobs)))
    lock = threading.Lock()
    failed = threading.Event()
    results = [None] * len(jobs)

    def worker():
        while not failed.is_set():
            with lock:
                index = next(pending, None)
            if index is None:
                return
            program, args = jobs[index]
            try:
                results[index] = jax.block_until_ready(program(*args))
            except BaseException:
                failed.set()
                raise

    for future in [_pool[0].submit(worker) for _ in range(threads)]:
        future.result()
    return results


#: On a CPU, ``register_many`` registers about this many voxels of pairs per call by
#: default: 7 pairs of 96x96, 1 of 192x192 or 48x48x48 (benchmarks/population.py: on 2
#: cores, 4-8 pairs of 96x96 a call gained the most, and one pair a call at 192x192).
CPU_CHUNK_VOXELS = 1 << 16


def plan(shape, platform: str, *, batch_size: int | None = None, threads: int | None = None):
    """How :func:`register_many` spreads a batch of ``shape`` ``(pairs, *spatial)`` on one
    device of ``platform`` ("cpu", "gpu", ...) before its memory check: returns
    ``(batch_size, threads, chunks)``, ``chunks`` the ``[start, stop)`` pairs of each call."""
    _check_count(batch_size, "batch_size")
    _check_count(threads, "threads")
    pairs, on_cpu = shape[0], platform == "cpu"
    if batch_size is None and on_cpu:
        batch_size = max(1, CPU_CHUNK_VOXELS // math.prod(shape[1:]))
    if threads is None:
        threads = _usable_cores() if on_cpu else 1
    chunks = _chunk_bounds(pairs, batch_size, threads)
    return batch_size, min(threads, len(chunks)), chunks


def _check_count(value, name: str):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")


def _platform(array) -> str:
    return next(iter(array.devices())).platform


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _chunk_bounds(pairs: int, batch_size: int | None, threads: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of chunks of at most ``batch_size`` pairs, as many as a multiple
    of ``threads`` where there are pairs enough, so that the threads finish together; sizes
    differ by at most one (two compiled shapes at most)."""
    size = pairs if batch_size is None else min(batch_size, pairs)
    count = -(-pairs // size)
    if threads > 1:
        count = min(pairs, threads * -(-count // threads))
    edges = np.linspace(0, pairs, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@functools.lru_cache(maxsize=64)  # the analysis takes milliseconds; the executables are kept anyway
def _bytes_per_call(executable) -> int:
    try:
        memory = executable.memory_analysis()
        return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)
    except Exception:  # a backend without the analysis: no estimate
        return 0


def _free_host_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None


def _calls_that_fit(executable, threads: int) -> int:
    """``threads``, or fewer where that many calls at once would hold more than half of
    the free host memory (each call has its own temporaries)."""
    per_call, free = _bytes_per_call(executable), _free_host_memory()
    if not per_call or free is None:
        return threads
    return max(1, min(threads, (free // 2) // per_call))


def _sharded(run, devices: list, pairs: int):
    if pairs % len(devices):
        raise ValueError(f"{pairs} pairs cannot be split evenly over {len(devices)} devices")
    device_ids = tuple(int(d.id) for d in devices)

    def sharded(f, m):
        # Each device runs the batch on its own pairs, so batch_size chunks each device's
        # share (a lax.map under jit alone would run over the whole batch, replicated).
        return jax.shard_map(run, mesh=_pairs_mesh(device_ids), in_specs=PartitionSpec("pairs"),
                             out_specs=PartitionSpec("pairs"), check_vma=False)(f, m)

    return sharded


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
