"""Training registration networks: pure train steps, a loop, checkpoints, data parallelism.

The network is split once into its graph (static) and its parameters (a pytree); from
then on training is pure functions of a :class:`TrainState` that is passed in and
returned:

- :func:`init` -> ``(graphdef, state)``;
- :func:`make_step` -> ``step(state, key) -> (state, metrics)``, one optimizer update on a
  batch drawn by ``sampler(key)``; :func:`make_chunk` runs ``n`` of them in one compiled
  loop so that a small network is not slowed by Python dispatch;
- :func:`train` is the loop around them: progress on stderr, a metrics log, checkpoints
  every so often and resume from the last one, data parallelism over ``devices``;
- :func:`save_checkpoint` / :func:`load_checkpoint` (flax msgpack, written atomically);
- :func:`fine_tune`: instance optimisation, a few steps on one pair starting from the
  trained weights.

Batches come from ``sampler(key) -> batch``, a pure function of a PRNG key (e.g.
:func:`jaxreg.datasets.pair_sampler`), so the draw is inside the compiled program and a run
is reproducible from its seed. A batch is a dict of arrays with the pairs on the leading
axis; the loss is the mean over pairs of ``loss_fn(net, pair)`` (see
:mod:`jaxreg.nn.losses`). With ``devices`` the batch is split over a one-axis mesh
``"data"`` and the parameters are replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxreg import io

__all__ = [
    "TrainState",
    "CheckpointReadError",
    "init",
    "batch_loss",
    "make_step",
    "make_chunk",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "restore_model",
    "load_network",
    "fine_tune",
    "data_mesh",
]

CHECKPOINT_FORMAT = 1


class CheckpointReadError(io.FileReadError):
    """A checkpoint file is corrupt, not a jaxreg checkpoint, or for another network."""

    what = "checkpoint"


class TrainState(NamedTuple):
    """Everything a training run carries from step to step."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def init(model: nnx.Module, optimizer: optax.GradientTransformation, *, seed: int = 0):
    """Split ``model`` into ``(graphdef, state)``; the graph holds the non-trainable rest."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    graph = (graphdef, rest)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.key(seed))
    return graph, state


def merge(graph, params) -> nnx.Module:
    """The module back from its graph and parameters (inside a transform: a pure read)."""
    graphdef, rest = graph
    return nnx.merge(graphdef, params, rest)


def batch_loss(graph, params, loss_fn: Callable, batch: dict):
    """Mean over the pairs of ``batch`` of ``loss_fn(net, pair)``; returns ``(loss, metrics)``."""

    def one(pair):
        return loss_fn(merge(graph, params), pair)

    losses, metrics = jax.vmap(one)(batch)
    metrics = {name: jnp.mean(value) for name, value in metrics.items()}
    return jnp.mean(losses), metrics


def make_step(graph, loss_fn: Callable, optimizer: optax.GradientTransformation, sampler: Callable, *, batch_sharding=None):
    """``step(state, batch=None) -> (state, metrics)``; the batch is drawn from ``state.key`` if not given.

    With ``batch_sharding`` (a :class:`NamedSharding` splitting the pairs over a mesh axis)
    each device computes the loss and gradient of its own pairs, and the means are
    averaged over the devices once per step (``lax.pmean`` in a ``shard_map``). Left to
    the compiler, the replicated parameters' gradient was all-reduced inside the network's
    step loop, once per step of :class:`Multistep` (7 all-reduces per training step for
    the MNIST network).
    """
    grad_fn = jax.value_and_grad(lambda params, batch: batch_loss(graph, params, loss_fn, batch), has_aux=True)
    if batch_sharding is not None:
        grad_fn = _data_parallel(grad_fn, batch_sharding)

    def step(state: TrainState, batch: dict | None = None):
        key, draw = jax.random.split(state.key)
        if batch is None:
            batch = sampler(draw)
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        (loss, metrics), grads = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1, key), {"loss": loss, **metrics}

    return step


def _data_parallel(grad_fn: Callable, batch_sharding: NamedSharding) -> Callable:
    """``grad_fn(params, batch)`` computed per shard of the batch and averaged over the
    shards (equal shards: the mean over all pairs)."""
    axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None  # a mesh axis name, or a tuple of them
    if not axes:
        raise ValueError(f"batch_sharding must split the first (pair) axis over a mesh axis; got {batch_sharding.spec}")
    mesh = batch_sharding.mesh
    shards = math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes))

    def local(params, batch):
        # Differentiate with respect to per-device copies: the gradient of the replicated
        # parameters would otherwise be summed over the devices at every use inside loops.
        return jax.lax.pmean(grad_fn(jax.lax.pcast(params, axes, to="varying"), batch), axes)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axes)), out_specs=PartitionSpec())

    def data_parallel(params, batch):
        pairs = {jnp.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(batch)}
        if any(n % shards for n in pairs):
            raise ValueError(f"a batch of {sorted(pairs)} pairs cannot be split evenly over {shards} devices; "
                             "choose a batch size that is a multiple of the device count")
        return sharded(params, batch)

    return data_parallel


def make_chunk(graph, loss_fn: Callable, optimizer: optax.GradientTransformation, sampler: Callable, length: int, *, batch_sharding=None):
    """``chunk(state, steps=length) -> (state, metrics)``: ``steps`` optimizer steps in one
    compiled loop, metrics averaged over them. ``steps`` is traced (a loop with a run-time
    trip count, which costs no more than a scan of fixed length), so the program compiled
    for a chunk of ``length`` also runs a shorter last chunk; ``batch_sharding`` as in
    :func:`make_step`."""
    # Jitted so that the loop body reuses the trace eval_shape makes of it (the metrics'
    # structure) instead of tracing the step a second time: 0.7 s of lowering for the 3-D
    # GradICON network. Inside the chunk's program it is inlined.
    step = jax.jit(make_step(graph, loss_fn, optimizer, sampler, batch_sharding=batch_sharding))

    def chunk(state, steps=length):
        zeros = jax.tree_util.tree_map(lambda m: jnp.zeros(m.shape, m.dtype), jax.eval_shape(step, state)[1])

        def body(_, carry):
            state, sums = carry
            state, metrics = step(state)
            return state, jax.tree_util.tree_map(jnp.add, sums, metrics)

        state, sums = jax.lax.fori_loop(0, steps, body, (state, zeros))
        taken = jnp.maximum(steps, 1).astype(jnp.float32)
        return state, jax.tree_util.tree_map(lambda total: total / taken, sums)

    return chunk


def data_mesh(devices: Sequence | None = None) -> Mesh:
    """A one-axis mesh ``"data"`` over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.array(devices), ("data",))


# ------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state: TrainState, *, spec: dict | None = None, overwrite: bool = True) -> Path:
    """Write ``state`` (and the model ``spec`` that rebuilds the network) to ``path`` atomically."""
    leaves = jax.tree_util.tree_leaves(jax.device_get(_key_data(state)))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": json.dumps(spec or {}),
        "leaves": {str(i): np.asarray(leaf) for i, leaf in enumerate(leaves)},
    }
    return io.write_bytes(path, serialization.msgpack_serialize(payload), overwrite=overwrite)


def _key_data(state: TrainState) -> TrainState:
    return state._replace(key=jax.random.key_data(state.key))


def _read_checkpoint(path) -> dict:
    path = Path(path)
    io._check_file(path, what="checkpoint")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a jaxreg checkpoint (format {CHECKPOINT_FORMAT})")
        payload["spec"] = json.loads(payload["spec"])
        return payload
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointReadError(path, str(error)) from None
    except Exception as error:  # msgpack raises its own exception types on corrupt bytes
        raise CheckpointReadError(path, f"corrupt file ({type(error).__name__})") from None


def _stored_like(payload: dict, path, template_leaves, *, noun: str, whole_state: bool) -> list:
    """The checkpoint's arrays shaped and typed like ``template_leaves``, or a
    CheckpointReadError naming the file. With ``whole_state`` the counts must match
    exactly (parameters, optimizer state, step, key); otherwise the parameters come first
    and the rest is ignored."""
    stored = payload["leaves"]
    if whole_state and len(stored) != len(template_leaves):
        raise CheckpointReadError(path, f"it holds {len(stored)} arrays, this network and optimizer need {len(template_leaves)}")
    if not whole_state and len(stored) < len(template_leaves):
        raise CheckpointReadError(path, f"it holds {len(stored)} arrays, this network has {len(template_leaves)}")
    leaves = []
    for i, expected in enumerate(template_leaves):
        value = np.asarray(stored[str(i)])
        if value.shape != np.shape(expected):
            raise CheckpointReadError(path, f"{noun} {i} has shape {value.shape}, this network needs {np.shape(expected)}")
        leaves.append(jnp.asarray(value, dtype=jnp.asarray(expected).dtype))
    return leaves


def load_checkpoint(path, template: TrainState) -> tuple[TrainState, dict]:
    """Read a checkpoint into the structure of ``template``; returns ``(state, spec)``.

    Raises :class:`jaxreg.io.FileReadError` naming the file when it is missing, corrupt or
    was written for a network of other shapes.
    """
    payload = _read_checkpoint(path)
    template_leaves, treedef = jax.tree_util.tree_flatten(_key_data(template))
    leaves = _stored_like(payload, path, template_leaves, noun="array", whole_state=True)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    return state._replace(key=jax.random.wrap_key_data(state.key)), payload["spec"]


def _parameters_into(model: nnx.Module, payload: dict, path) -> nnx.Module:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = _stored_like(payload, path, param_leaves, noun="parameter", whole_state=False)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), rest)


def restore_model(path, model: nnx.Module) -> nnx.Module:
    """Load only the parameters of a checkpoint into ``model`` (the optimizer state is ignored)."""
    return _parameters_into(model, _read_checkpoint(path), path)


def load_network(path) -> tuple[nnx.Module, dict]:
    """The trained network a checkpoint names, rebuilt from its spec: ``(network, spec)``.

    Reads the file once. A checkpoint written without ``spec=`` raises
    :class:`CheckpointReadError`, as does a spec that names no known architecture.
    """
    from jaxreg.nn import models

    payload = _read_checkpoint(path)
    spec = payload["spec"]
    if not spec or "name" not in spec:
        raise CheckpointReadError(path, "the checkpoint does not name its network (train with spec=...)")
    try:
        network = models.build(spec)
    except (ValueError, TypeError) as err:
        raise CheckpointReadError(path, str(err)) from None
    return _parameters_into(network, payload, path), spec


# -------------------------------------------------------------------------------- loop


def _progress(done: int, total: int, loss: float, started: float, stream) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.perf_counter() - started, 1e-9)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.5g} {rate:.1f} steps/s")
    if done >= total:
        stream.write("\n")
    stream.flush()


def train(
    model: nnx.Module,
    loss_fn: Callable,
    sampler: Callable,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    seed: int = 0,
    log_every: int = 50,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    spec: dict | None = None,
    devices: Sequence | None = None,
    progress: bool = True,
    log_file: str | Path | None = None,
    before_chunk: Callable[[], None] | None = None,
):
    """Train ``model`` for ``steps`` optimizer steps; returns ``(model, state, history)``.

    ``history`` holds one dict per ``log_every`` steps (``step``, ``seconds``, the metrics
    averaged over those steps). Steps run ``log_every`` at a time in one compiled loop (a
    shorter last chunk runs in the same program: one compilation per run);
    the first chunk's wall time includes compilation and is reported as
    ``compile_seconds`` in its log entry. With ``checkpoint`` the state is saved there
    every ``checkpoint_every`` steps (default: at the end only) and, with ``resume``, a run
    starts from the checkpoint if it exists. ``log_file`` receives the history as JSON
    lines. With ``devices`` (a list of several) the batch is sharded over them.
    ``before_chunk()`` is called before every chunk, outside its timing (the benchmarks
    use it to take turns with another program on the same machine).
    """
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    if int(log_every) < 1:
        raise ValueError(f"log_every must be >= 1; got {log_every}")
    graph, state = init(model, optimizer, seed=seed)
    # The compiled chunks donate their input state: train on copies, never on the
    # caller's own parameter arrays.
    state = jax.tree_util.tree_map(jnp.copy, state)
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state, stored_spec = load_checkpoint(checkpoint, state)
        spec = stored_spec if spec is None else spec
    batch_sharding = None
    if devices is not None and len(devices) > 1:
        mesh = data_mesh(devices)
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        state = jax.device_put(state, replicated)
    # One program for every chunk: a shorter one (the last, or the first after resuming
    # mid-way) passes its step count at run time instead of compiling a loop of its own.
    chunk = jax.jit(make_chunk(graph, loss_fn, optimizer, sampler, int(log_every), batch_sharding=batch_sharding), donate_argnums=0)
    history = []
    stream = sys.stderr
    started = time.perf_counter()
    done = int(state.step)
    next_checkpoint = _next_multiple(done, checkpoint_every)
    log = None if log_file is None else open(log_file, "a")
    try:
        while done < steps:
            length = min(log_every - done % log_every, steps - done)
            if before_chunk is not None:
                before_chunk()
            t0 = time.perf_counter()
            first_call = len(history) == 0
            state, metrics = chunk(state, np.int32(length))
            metrics = {name: float(value) for name, value in metrics.items()}
            done = int(state.step)
            entry = {"step": done, "seconds": time.perf_counter() - t0, **metrics}
            if first_call:
                entry["compile_seconds"] = entry["seconds"]
            history.append(entry)
            if log is not None:
                log.write(json.dumps(entry) + "\n")
                log.flush()
            if progress:
                _progress(done, steps, metrics["loss"], started, stream)
            if checkpoint is not None and next_checkpoint is not None and done >= next_checkpoint:
                save_checkpoint(checkpoint, state, spec=spec)
                next_checkpoint = _next_multiple(done, checkpoint_every)
    finally:
        if log is not None:
            log.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, state, spec=spec)
    return merge(graph, state.params), state, history


def _next_multiple(done: int, every: int | None):
    if every is None:
        return None
    if int(every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1; got {every}")
    return (done // every + 1) * every


def fine_tune(model: nnx.Module, loss_fn: Callable, pair: dict, *, steps: int = 50, optimizer: optax.GradientTransformation | None = None):
    """Instance optimisation: ``steps`` updates of a copy of ``model`` on the one ``pair``.

    Returns ``(tuned_model, losses)``; ``model`` itself is not changed. The default
    optimizer is Adam with learning rate 1e-4, small enough to refine rather than forget.
    """
    optimizer = optimizer or optax.adam(1e-4)
    graph, state = init(model, optimizer)
    batch = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], pair)
    step = make_step(graph, loss_fn, optimizer, sampler=None)

    def body(state, _):
        state, metrics = step(state, batch)
        return state, metrics["loss"]

    state, losses = jax.jit(lambda s: jax.lax.scan(body, s, None, length=int(steps)))(state)
    return merge(graph, state.params), losses
