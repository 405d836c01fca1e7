"""jaxreg.nn: networks as (moving, fixed) -> Transform, losses against analytic values,
training (determinism, checkpoint resume, data parallelism), inference in world space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxreg.nn as jnn
import jaxreg
from jaxreg import datasets, synthetic
from jaxreg.grid import Grid, Image
from jaxreg.nn import inference, training
from jaxreg.nn.losses import displacement_on_grid
from jaxreg.transforms import Affine, Displacement, Velocity, compose

from helpers import assert_grad_matches_fd, assert_vmap_matches_loop


@pytest.fixture(autouse=True)
def _full_float32():
    """Networks multiply at the backend's default precision: TF32 on a GPU, where a batched
    and a per-pair program round differently (4e-4 apart on an H200). These tests compare
    arithmetic (vmap against a loop, gradients against finite differences), so in float32."""
    with jax.default_matmul_precision("highest"):
        yield


class Fixed(nnx.Module):
    """A 'network' that returns a given transform whatever it sees."""

    def __init__(self, transform):
        self.transform = nnx.data(transform)

    def __call__(self, moving, fixed):
        return self.transform


class MeanShift(nnx.Module):
    """Shift by ``scale * (mean(moving) - mean(fixed))`` along every axis: odd in the pair order."""

    def __init__(self, shape, scale):
        self.shape = tuple(shape)
        self.scale = nnx.Param(jnp.asarray(scale, jnp.float32))

    def __call__(self, moving, fixed):
        shift = self.scale[...] * (jnp.mean(moving) - jnp.mean(fixed))
        return Displacement(jnp.full(self.shape + (len(self.shape),), shift))


def _blob_pair(shape=(16, 16), seed=0):
    image, _ = synthetic.blobs(jax.random.key(seed), shape, labels=2)
    return jnp.asarray(image, jnp.float32)


def _index_points(shape):
    return Grid(shape).points()


# ------------------------------------------------------------------------------ modules


@pytest.mark.parametrize(
    "make",
    [
        lambda: jnn.DisplacementField(jnn.MLP((12, 10), hidden=(8,), rngs=nnx.Rngs(0))),
        lambda: jnn.VelocityField(jnn.UNet(2, features=(4, 8), rngs=nnx.Rngs(0))),
        lambda: jnn.AffineHead(2, features=(4, 8), rngs=nnx.Rngs(0)),
        lambda: jnn.Multistep(jnn.DisplacementField(jnn.MLP((12, 10), hidden=(8,), rngs=nnx.Rngs(0))), steps=3),
        lambda: jnn.TwoStep(jnn.AffineHead(2, features=(4,), rngs=nnx.Rngs(0)), jnn.DisplacementField(jnn.UNet(2, features=(4, 8, 8), rngs=nnx.Rngs(1)))),
        lambda: jnn.Downsampled(jnn.DisplacementField(jnn.UNet(2, features=(4, 8), rngs=nnx.Rngs(0))), factor=2, ndim=2),
    ],
    ids=["mlp", "unet-velocity", "affine", "multistep", "two-step", "downsampled"],
)
def test_every_network_starts_as_the_identity(make):
    net = make()
    rng = np.random.default_rng(0)
    moving, fixed = (jnp.asarray(rng.random((12, 10)), jnp.float32) for _ in range(2))
    points = _index_points((12, 10))
    np.testing.assert_allclose(net(moving, fixed).mapped_points(Grid((12, 10))), points, atol=1e-6)


def test_unet_any_size_and_rank_and_output_shape():
    net = jnn.UNet(3, features=(2, 4, 4), rngs=nnx.Rngs(0))
    pair = jnp.ones((9, 6, 5, 2))
    assert net(pair).shape == (9, 6, 5, 3)
    # With a non-zero last layer the output is not trivially zero and depends on the input.
    net.out.kernel[...] = jnp.ones_like(net.out.kernel[...]) * 0.01
    a, b = net(pair), net(pair * 2.0)
    assert float(jnp.abs(a - b).max()) > 1e-4


def test_mlp_rejects_other_sizes_and_pair_rejects_mismatch():
    net = jnn.DisplacementField(jnn.MLP((8, 8), hidden=(4,), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"built for images of shape \(8, 8\)"):
        net(jnp.zeros((9, 8)), jnp.zeros((9, 8)))
    with pytest.raises(ValueError, match="same shape"):
        net(jnp.zeros((8, 8)), jnp.zeros((8, 8, 2)))


def test_two_step_composes_first_then_second():
    first = Affine.from_linear(jnp.array([[1.1, 0.2], [0.0, 0.9]]), jnp.array([1.0, -2.0]))
    second = Affine.from_linear(jnp.array([[0.8, 0.0], [0.3, 1.0]]), jnp.array([0.5, 0.25]))
    net = jnn.TwoStep(Fixed(first), Fixed(second))
    x = jnp.array([[3.0, 4.0], [0.0, 7.0]])
    image = jnp.zeros((8, 8))
    # psi is found after warping by phi, so the moving image is read at phi(psi(x)).
    np.testing.assert_allclose(net(image, image)(x), first(second(x)), rtol=1e-6)


def test_multistep_equals_nested_two_step_at_the_voxels():
    rng = np.random.default_rng(1)
    inner = jnn.DisplacementField(jnn.MLP((10, 10), hidden=(6,), rngs=nnx.Rngs(0)))
    inner.backbone.out.kernel[...] = jnp.asarray(rng.normal(size=inner.backbone.out.kernel[...].shape) * 0.05, jnp.float32)
    inner.backbone.out.bias[...] = jnp.asarray(rng.uniform(0.1, 0.3, size=inner.backbone.out.bias[...].shape), jnp.float32)
    moving, fixed = (jnp.asarray(rng.random((10, 10)), jnp.float32) for _ in range(2))
    grid = Grid((10, 10))
    multi = jnn.Multistep(inner, steps=2)(moving, fixed).mapped_points(grid)
    nested = jnn.TwoStep(inner, inner)(moving, fixed).mapped_points(grid)
    assert float(jnp.abs(multi - grid.points()).max()) > 0.05  # the net does move things
    np.testing.assert_allclose(multi, nested, atol=1e-5)


class _Plain(nnx.Module):
    """A head without ``given_fixed``: Multistep calls it as ``net(moving, fixed)`` each step."""

    def __init__(self, net):
        self.net = net
        self.ndim = net.ndim

    def __call__(self, moving, fixed):
        return self.net(moving, fixed)


@pytest.mark.parametrize("hidden, channels", [((6,), 1), ((6, 5), 2), ((), 1)])
def test_given_fixed_computes_the_plain_call_and_its_gradient(hidden, channels):
    rng = np.random.default_rng(4)
    head = jnn.DisplacementField(jnn.MLP((6, 5), hidden=hidden, channels=channels, rngs=nnx.Rngs(0)))
    head.backbone.out.kernel[...] = jnp.asarray(rng.normal(size=head.backbone.out.kernel[...].shape) * 0.05, jnp.float32)
    head.backbone.out.bias[...] = jnp.asarray(rng.uniform(0.1, 0.3, size=head.backbone.out.bias[...].shape), jnp.float32)
    shape = (6, 5) if channels == 1 else (6, 5, channels)
    moving, fixed = (jnp.asarray(rng.random(shape), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(head.given_fixed(fixed)(moving).field, head(moving, fixed).field, rtol=1e-5, atol=1e-6)

    def loss(net, moving, fixed):
        return jnp.sum(jnp.sin(3.0 * net(moving, fixed).field))

    hoisted, plain = jnn.Multistep(head, steps=3), jnn.Multistep(_Plain(head), steps=3)
    grad_hoisted = nnx.grad(loss)(hoisted, moving, fixed)
    grad_plain = nnx.grad(loss)(plain, moving, fixed)
    for a, b in zip(jax.tree_util.tree_leaves(grad_hoisted), jax.tree_util.tree_leaves(grad_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    # Under jit and vmap over pairs, as training calls it.
    graph, params = nnx.split(hoisted)
    batched = jax.jit(jax.vmap(lambda m, f: nnx.merge(graph, params)(m, f).field))
    stacked_m, stacked_f = jnp.stack([moving, fixed]), jnp.stack([fixed, moving])
    for i in range(2):
        np.testing.assert_allclose(batched(stacked_m, stacked_f)[i], plain(stacked_m[i], stacked_f[i]).field, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        head.given_fixed(fixed)(jnp.zeros((6, 4)))
    with pytest.raises(ValueError, match="channel"):
        head.backbone.given_fixed(jnp.zeros((6, 5, channels + 1)))


def test_multistep_trajectory_records_every_step():
    net = jnn.Multistep(Fixed(Displacement(jnp.full((6, 6, 2), 0.5))), steps=3)
    fields = net.trajectory(jnp.zeros((6, 6)), jnp.zeros((6, 6)))
    # Constant shifts add up: 0.5, 1.0, 1.5 voxels.
    np.testing.assert_allclose(fields[:, 2, 2, 0], [0.5, 1.0, 1.5], atol=1e-6)


def test_downsampled_lifts_coarse_voxels_to_full_voxels():
    coarse_u = jnp.zeros((4, 5, 2)).at[..., 0].set(1.0).at[..., 1].set(-0.5)
    net = jnn.Downsampled(Fixed(Displacement(coarse_u)), factor=2, ndim=2)
    t = net(jnp.zeros((8, 10)), jnp.zeros((8, 10)))
    # One coarse voxel is two full voxels.
    np.testing.assert_allclose(displacement_on_grid(t, Grid((8, 10))), jnp.broadcast_to(jnp.array([2.0, -1.0]), (8, 10, 2)), atol=1e-6)
    # A linear coarse field u(y) = 0.1 * y0 is 0.2 * y0(x) at full size, y0 = (x0 - 0.5) / 2.
    y0 = Grid((4, 5)).points()[..., 0]
    linear = Downsampled_field = jnn.Downsampled(Fixed(Displacement(jnp.stack([0.1 * y0, 0 * y0], -1))), factor=2, ndim=2)
    x = jnp.array([[3.0, 4.0], [4.5, 2.0]])
    expected = x.at[:, 0].add(0.2 * (x[:, 0] - 0.5) / 2.0)
    np.testing.assert_allclose(linear(jnp.zeros((8, 10)), jnp.zeros((8, 10)))(x), expected, atol=1e-5)
    del Downsampled_field


def test_downsampled_velocity_stays_a_velocity():
    v = Velocity(jnp.full((4, 4, 2), 0.25))
    t = jnn.Downsampled(Fixed(v), factor=2, ndim=2)(jnp.zeros((8, 8)), jnp.zeros((8, 8)))
    assert isinstance(t, Velocity)
    np.testing.assert_allclose(t(jnp.array([[3.0, 3.0]])), [[3.5, 3.5]], atol=1e-5)


# ------------------------------------------------------------------------------- losses


def test_regularized_loss_of_a_known_shift():
    ramp = jnp.tile(jnp.arange(8.0), (8, 1))
    shift = Fixed(Displacement(jnp.zeros((8, 8, 2)).at[..., 1].set(1.0)))
    loss, terms = jnn.regularized(lmbda=0.5)(shift, {"moving": ramp, "fixed": ramp + 1.0})
    # The shift is exact except in the last column, which reads beyond the image (0): (0 - 8)^2 / 8.
    np.testing.assert_allclose(terms["similarity"], 64.0 / 8.0, rtol=1e-6)
    np.testing.assert_allclose(terms["regularity"], 0.0, atol=1e-7)
    np.testing.assert_allclose(loss, terms["similarity"], rtol=1e-6)


def test_icon_and_gradicon_of_shifts_and_affines():
    a = jnp.zeros((10, 10)).at[3:6, 3:6].set(1.0)
    b = a * 0.5
    pair = {"moving": a, "fixed": b}
    odd = MeanShift((10, 10), scale=10.0)  # phi_AB = +d, phi_BA = -d: exact inverses
    _, terms = jnn.icon(lmbda=1.0)(odd, pair)
    np.testing.assert_allclose(terms["inverse_consistency"], 0.0, atol=1e-10)
    same = Fixed(Displacement(jnp.full((10, 10, 2), 0.3)))  # both directions +0.3: round trip +0.6
    _, terms = jnn.icon(lmbda=1.0)(same, pair)
    np.testing.assert_allclose(terms["inverse_consistency"], 2 * 0.6**2, rtol=1e-5)
    _, terms = jnn.gradicon(lmbda=1.0)(same, pair)
    np.testing.assert_allclose(terms["gradient_inverse_consistency"], 0.0, atol=1e-8)
    linear = jnp.array([[1.1, 0.1], [0.0, 0.95]])
    affine = Fixed(Affine.from_linear(linear, jnp.zeros(2)))
    _, terms = jnn.gradicon(lmbda=1.0)(affine, pair)
    expected = float(jnp.sum((linear @ linear - jnp.eye(2)) ** 2))
    np.testing.assert_allclose(terms["gradient_inverse_consistency"], expected, rtol=1e-4)


def test_supervised_and_dice_terms():
    target = jnp.zeros((6, 6, 2)).at[..., 0].set(1.0)
    net = Fixed(Displacement(jnp.zeros((6, 6, 2))))
    loss, _ = jnn.supervised()(net, {"moving": jnp.zeros((6, 6)), "fixed": jnp.zeros((6, 6)), "target": target})
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    labels = jnp.zeros((6, 6), jnp.int32).at[1:4, 1:4].set(1).at[4:, 4:].set(2)
    pair = {"moving": labels * 1.0, "fixed": labels * 1.0, "moving_labels": labels, "fixed_labels": labels}
    _, terms = jnn.regularized(dice_weight=1.0, labels=(1, 2))(net, pair)
    np.testing.assert_allclose(terms["dice_loss"], 0.0, atol=1e-5)
    with pytest.raises(KeyError, match="moving_labels"):
        jnn.regularized(dice_weight=1.0, labels=(1,))(net, {"moving": labels * 1.0, "fixed": labels * 1.0})
    with pytest.raises(ValueError, match="target displacement must have shape"):
        jnn.supervised()(net, {"moving": jnp.zeros((6, 6)), "fixed": jnp.zeros((6, 6)), "target": target[:5]})


def _small_mlp_net(seed=0, shape=(8, 8)):
    """A two-step MLP net moved off the identity, with a bias so that no sampling point
    sits exactly on a voxel (where linear interpolation has a kink and central
    differences would average the two one-sided derivatives)."""
    net = jnn.Multistep(jnn.DisplacementField(jnn.MLP(shape, hidden=(16,), rngs=nnx.Rngs(seed))), steps=2)
    rng = np.random.default_rng(seed)
    out = net.net.backbone.out
    out.kernel[...] = jnp.asarray(rng.normal(size=out.kernel[...].shape) * 0.05, jnp.float32)
    out.bias[...] = jnp.asarray(rng.uniform(0.1, 0.3, size=out.bias[...].shape), jnp.float32)
    return net


@pytest.mark.parametrize(
    "loss",
    [jnn.regularized(lmbda=0.05), jnn.icon(lmbda=0.1), jnn.gradicon(lmbda=0.1), jnn.supervised()],
    ids=["diffusion", "icon", "gradicon", "supervised"],
)
def test_losses_jit_vmap_and_gradient(loss):
    net = _small_mlp_net()
    graph, state = training.init(net, optax.sgd(0.1))
    rng = np.random.default_rng(3)
    batch = {
        "moving": jnp.asarray(rng.random((3, 8, 8)), jnp.float32),
        "fixed": jnp.asarray(rng.random((3, 8, 8)), jnp.float32),
        "target": jnp.asarray(rng.normal(0, 0.5, (3, 8, 8, 2)), jnp.float32),  # read by supervised() only
    }

    def one(params, pair):
        return loss(training.merge(graph, params), pair)[0]

    eager = one(state.params, jax.tree_util.tree_map(lambda a: a[0], batch))
    np.testing.assert_allclose(jax.jit(one)(state.params, jax.tree_util.tree_map(lambda a: a[0], batch)), eager, rtol=1e-5)
    assert_vmap_matches_loop(lambda pair: one(state.params, pair), batch, rtol=1e-5)
    pair0 = jax.tree_util.tree_map(lambda a: a[0], batch)
    assert_grad_matches_fd(lambda params: one(params, pair0), state.params, eps=1e-4, rtol=5e-2, atol=1e-5)


def test_multistep_remat_gives_the_same_loss_and_gradient():
    """Recomputing each step in the backward pass (remat) changes memory, not numbers;
    and the plain call's map is the last of the trajectory."""
    net = _small_mlp_net()
    net.steps = 3
    rng = np.random.default_rng(5)
    pair = {"moving": jnp.asarray(rng.random((8, 8)), jnp.float32), "fixed": jnp.asarray(rng.random((8, 8)), jnp.float32)}
    loss = jnn.gradicon(lmbda=0.1)
    graph, state = training.init(net, optax.sgd(0.1))

    def value_and_grad(remat):
        def one(params):
            model = training.merge(graph, params)
            model.remat = remat
            return loss(model, pair)[0]

        program = str(jax.make_jaxpr(jax.value_and_grad(one))(state.params))
        # sample() checkpoints its own tangent reads of displacement fields, so count.
        checkpoints = program.count("checkpoint") + program.count("remat")
        return jax.jit(jax.value_and_grad(one))(state.params), checkpoints

    ((kept, kept_grad), plain), ((recomputed, recomputed_grad), rematted) = value_and_grad(False), value_and_grad(True)
    assert rematted > plain, (rematted, plain)
    np.testing.assert_allclose(recomputed, kept, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(recomputed_grad), jax.tree_util.tree_leaves(kept_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    field = net(pair["moving"], pair["fixed"]).field
    np.testing.assert_array_equal(field, net.trajectory(pair["moving"], pair["fixed"])[-1])


# ----------------------------------------------------------------------------- training


def _translation_sampler(shape=(8, 8), batch_size=8):
    rng = np.random.default_rng(0)
    images = np.zeros((16,) + shape, np.float32)
    for i in range(16):
        r, c = rng.integers(2, 4, size=2)
        images[i, r : r + 3, c : c + 3] = 1.0
    return datasets.pair_sampler(images, batch_size=batch_size)


def test_training_reduces_the_loss_and_is_deterministic(tmp_path):
    sampler = _translation_sampler()
    runs = []
    for _ in range(2):
        net = jnn.Multistep(jnn.DisplacementField(jnn.MLP((8, 8), hidden=(16,), rngs=nnx.Rngs(0))), steps=2)
        model, state, history = jnn.train(net, jnn.regularized(lmbda=0.01), sampler, optax.adam(3e-3), steps=60, log_every=20, seed=1, progress=False)
        runs.append((state, history))
    (state_a, history_a), (state_b, history_b) = runs
    assert history_a[-1]["loss"] < 0.8 * history_a[0]["loss"]
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]
    for a, b in zip(jax.tree_util.tree_leaves(state_a.params), jax.tree_util.tree_leaves(state_b.params)):
        np.testing.assert_array_equal(a, b)
    assert int(state_a.step) == 60 and "compile_seconds" in history_a[0]


def test_before_chunk_is_called_before_every_chunk_and_changes_nothing():
    sampler = _translation_sampler()
    make = lambda: jnn.Multistep(jnn.DisplacementField(jnn.MLP((8, 8), hidden=(8,), rngs=nnx.Rngs(0))), steps=2)  # noqa: E731
    calls = []
    _, hooked, history = jnn.train(make(), jnn.regularized(), sampler, optax.adam(1e-3), steps=12, log_every=5, seed=2,
                                   progress=False, before_chunk=lambda: calls.append(None))
    _, plain, _ = jnn.train(make(), jnn.regularized(), sampler, optax.adam(1e-3), steps=12, log_every=5, seed=2, progress=False)
    assert [h["step"] for h in history] == [5, 10, 12] and len(calls) == 3
    for a, b in zip(jax.tree_util.tree_leaves(hooked.params), jax.tree_util.tree_leaves(plain.params)):
        np.testing.assert_array_equal(a, b)


def test_a_shorter_last_chunk_runs_in_the_same_program_and_equals_single_steps():
    sampler = _translation_sampler()
    make = lambda: jnn.Multistep(jnn.DisplacementField(jnn.MLP((8, 8), hidden=(8,), rngs=nnx.Rngs(0))), steps=2)  # noqa: E731
    traces = []
    base = jnn.regularized()

    def counted(*args, **kwargs):
        traces.append(None)  # runs once per trace of the step, not per step
        return base(*args, **kwargs)

    _, state, history = jnn.train(make(), counted, sampler, optax.adam(1e-3), steps=7, log_every=3, seed=2, progress=False)
    uneven = len(traces)
    traces.clear()
    jnn.train(make(), counted, sampler, optax.adam(1e-3), steps=6, log_every=3, seed=2, progress=False)
    assert [h["step"] for h in history] == [3, 6, 7] and uneven == len(traces) > 0
    # the same 7 updates, one compiled step at a time
    graph, single = training.init(make(), optax.adam(1e-3), seed=2)
    step = jax.jit(training.make_step(graph, base, optax.adam(1e-3), sampler))
    losses = []
    for _ in range(7):
        single, metrics = step(single)
        losses.append(float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(history[-1]["loss"], losses[-1], rtol=1e-6)
    np.testing.assert_allclose(history[0]["loss"], np.mean(losses[:3]), rtol=1e-6)


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    sampler = _translation_sampler()
    make = lambda: jnn.Multistep(jnn.DisplacementField(jnn.MLP((8, 8), hidden=(8,), rngs=nnx.Rngs(0))), steps=2)  # noqa: E731
    _, straight, _ = jnn.train(make(), jnn.regularized(), sampler, optax.adam(1e-3), steps=20, log_every=5, seed=2, progress=False)
    path = tmp_path / "run.ckpt"
    spec = {"name": "mnist-multistep", "kwargs": {"shape": [8, 8], "hidden": [8], "steps": 2}}
    jnn.train(make(), jnn.regularized(), sampler, optax.adam(1e-3), steps=10, log_every=5, seed=2, progress=False, checkpoint=path, spec=spec)
    log = tmp_path / "log.jsonl"
    model, resumed, history = jnn.train(make(), jnn.regularized(), sampler, optax.adam(1e-3), steps=20, log_every=5, seed=2, progress=False, checkpoint=path, log_file=log)
    assert [h["step"] for h in history] == [15, 20]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [15, 20]
    for a, b in zip(jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The checkpoint names its network: build + restore gives the trained model.
    _, stored_spec = training.load_checkpoint(path, resumed)
    assert stored_spec == spec
    rebuilt = training.restore_model(path, jnn.build(stored_spec))
    x = jnp.zeros((8, 8)).at[2:5, 2:5].set(1.0)
    np.testing.assert_allclose(rebuilt(x, x.T).field, model(x, x.T).field, atol=1e-6)


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    net = jnn.DisplacementField(jnn.MLP((8, 8), hidden=(4,), rngs=nnx.Rngs(0)))
    _, state = training.init(net, optax.adam(1e-3))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not msgpack at all \x00\x01")
    with pytest.raises(training.CheckpointReadError, match="bad.ckpt"):
        training.load_checkpoint(bad, state)
    good = tmp_path / "good.ckpt"
    training.save_checkpoint(good, state)
    other = jnn.DisplacementField(jnn.MLP((8, 8), hidden=(5,), rngs=nnx.Rngs(0)))
    _, other_state = training.init(other, optax.adam(1e-3))
    with pytest.raises(training.CheckpointReadError, match="shape"):
        training.load_checkpoint(good, other_state)
    with pytest.raises(FileNotFoundError):
        training.load_checkpoint(tmp_path / "missing.ckpt", state)


def test_fine_tune_improves_one_pair_and_leaves_the_model_alone():
    net = jnn.Multistep(jnn.DisplacementField(jnn.MLP((8, 8), hidden=(8,), rngs=nnx.Rngs(0))), steps=2)
    moving = jnp.zeros((8, 8)).at[2:5, 2:5].set(1.0)
    fixed = jnp.zeros((8, 8)).at[3:6, 3:6].set(1.0)
    before = [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param))]
    tuned, losses = jnn.fine_tune(net, jnn.regularized(lmbda=0.01), {"moving": moving, "fixed": fixed}, steps=40, optimizer=optax.adam(1e-2))
    assert float(losses[-1]) < 0.5 * float(losses[0])
    after = [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param))]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_data_parallel_loss_and_gradients_equal_single_device():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec
        import jaxreg.nn as jnn
        from jaxreg.nn import training
        assert jax.device_count() == 8, jax.devices()
        net = jnn.Multistep(jnn.DisplacementField(jnn.MLP((8, 8), hidden=(6,), rngs=nnx.Rngs(0))), steps=2)
        out = net.net.backbone.out
        out.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(size=out.kernel[...].shape) * 0.05, jnp.float32)
        graph, state = training.init(net, optax.adam(1e-3))
        rng = np.random.default_rng(1)
        batch = {"moving": jnp.asarray(rng.random((16, 8, 8)), jnp.float32), "fixed": jnp.asarray(rng.random((16, 8, 8)), jnp.float32)}
        loss_fn = jnn.gradicon(lmbda=0.1)
        f = jax.jit(jax.value_and_grad(lambda p, b: training.batch_loss(graph, p, loss_fn, b)[0]))
        single = f(state.params, batch)
        mesh = training.data_mesh()
        sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
        params = jax.device_put(state.params, NamedSharding(mesh, PartitionSpec()))
        multi = f(params, sharded_batch)
        assert len(sharded_batch["moving"].sharding.device_set) == 8
        np.testing.assert_allclose(multi[0], single[0], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(multi[1]), jax.tree_util.tree_leaves(single[1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        # And the training loop itself runs sharded, giving the single-device result.
        sampler = lambda key: batch
        _, s8, _ = jnn.train(net, loss_fn, sampler, optax.sgd(0.1), steps=3, log_every=3, progress=False, devices=jax.devices())
        _, s1, _ = jnn.train(net, loss_fn, sampler, optax.sgd(0.1), steps=3, log_every=3, progress=False)
        for a, b in zip(jax.tree_util.tree_leaves(s8.params), jax.tree_util.tree_leaves(s1.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
        # With a sampler that draws from the key, both draw the same batches: one key
        # split per step whatever the device count.
        images = jnp.asarray(rng.random((40, 8, 8)), jnp.float32)
        drawing = lambda key: dict(zip(("moving", "fixed"), images[jax.random.randint(key, (2, 16), 0, 40)]))
        _, d8, _ = jnn.train(net, loss_fn, drawing, optax.sgd(0.1), steps=3, log_every=3, progress=False, devices=jax.devices())
        _, d1, _ = jnn.train(net, loss_fn, drawing, optax.sgd(0.1), steps=3, log_every=3, progress=False)
        np.testing.assert_array_equal(jax.random.key_data(d8.key), jax.random.key_data(d1.key))
        for a, b in zip(jax.tree_util.tree_leaves(d8.params), jax.tree_util.tree_leaves(d1.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
        # The devices average their gradients once per training step, not inside the
        # network's own loop over its steps: one computation holds all-reduces (the
        # training loop's body).
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        graph4, state4 = training.init(jnn.Multistep(net.net, steps=4), optax.sgd(0.1))
        chunk = jax.jit(training.make_chunk(graph4, loss_fn, optax.sgd(0.1), sampler, 2, batch_sharding=sharding))
        hlo = chunk.lower(jax.device_put(state4, NamedSharding(mesh, PartitionSpec()))).compile().as_text()
        bodies = [c for c in hlo.split("\\n\\n") if "all-reduce(" in c]
        assert len(bodies) == 1, [c.splitlines()[0] for c in bodies]
        try:
            training.make_step(graph, loss_fn, optax.sgd(0.1), sampler, batch_sharding=sharding)(state, {k: v[:12] for k, v in batch.items()})
        except ValueError as e:
            assert "12" in str(e) and "8 devices" in str(e), e
        else:
            raise AssertionError("an uneven batch was accepted")
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------ inference


def test_register_images_lifts_index_transforms_to_world():
    affine = np.diag([2.0, 3.0, 1.0]).astype(np.float32)
    affine[:2, 2] = [10.0, -5.0]
    fixed = Image(jnp.asarray(_blob_pair((12, 10))), affine)
    moving = Image(jnp.asarray(_blob_pair((12, 10), seed=1)), affine)
    u = jnp.zeros((12, 10, 2)).at[..., 0].set(0.5).at[..., 1].set(-1.0)
    prediction = inference.register_images(Fixed(Displacement(u)), fixed, moving)
    world = fixed.grid.points()
    # Half a voxel along axis 0 is 1 mm; minus one voxel along axis 1 is -3 mm.
    np.testing.assert_allclose(prediction.transform(world.reshape(-1, 2)), (world + jnp.array([1.0, -3.0])).reshape(-1, 2), atol=1e-4)
    assert prediction.warped.shape == (12, 10)


def test_register_images_on_a_network_grid_of_other_shape():
    fixed = Image(jnp.ones((16, 12)), np.diag([1.0, 1.0, 1.0]).astype(np.float32))
    grid = inference.network_grid(fixed.grid, (8, 6))
    # Same extent: the first and last voxel centres sit half a voxel inside the full grid's edges.
    np.testing.assert_allclose(grid.points()[0, 0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(grid.points()[-1, -1], [14.5, 10.5], atol=1e-6)
    with pytest.raises(ValueError, match="takes 3-D inputs"):
        inference.network_grid(fixed.grid, (4, 4, 4))


def test_build_knows_its_architectures():
    net = jnn.build({"name": "unet-two-step", "kwargs": {"ndim": 2, "features": [4, 8]}})
    x = jnp.zeros((8, 8))
    np.testing.assert_allclose(net(x, x).mapped_points(Grid((8, 8))), Grid((8, 8)).points(), atol=1e-6)
    with pytest.raises(ValueError, match="unknown architecture"):
        jnn.build({"name": "resnet"})


def test_composition_with_world_affines_matches_compose():
    # register_images relies on compose(A, t, A^-1) being t in world coordinates.
    a = Affine(jnp.asarray(np.diag([2.0, 2.0, 1.0]), jnp.float32))
    t = Displacement(jnp.full((4, 4, 2), 1.0))
    x = jnp.array([[2.0, 4.0]])
    np.testing.assert_allclose(compose(a, t, a.inverse())(x), x + 2.0, atol=1e-6)


# ------------------------------------------------------------------------------------ CLI


def test_cli_register_with_a_trained_model(tmp_path, capsys):
    import nibabel as nib

    from jaxreg import cli, io

    sampler = _translation_sampler(shape=(12, 12), batch_size=4)
    spec = {"name": "mnist-multistep", "kwargs": {"shape": [12, 12], "hidden": [8], "steps": 2}}
    checkpoint = tmp_path / "model.ckpt"
    model, _, _ = jnn.train(jnn.build(spec), jnn.regularized(), sampler, optax.adam(1e-2), steps=20, log_every=10, progress=False, checkpoint=checkpoint, spec=spec)
    fixed = np.zeros((12, 12), np.float32)
    fixed[4:8, 5:9] = 1.0
    moving = np.roll(fixed, 1, axis=0)
    affine = np.diag([2.0, 2.0, 1.0, 1.0]).astype(np.float32)
    io.save(Image(fixed, affine[[0, 1, 3]][:, [0, 1, 3]]), tmp_path / "fixed.nii.gz")
    io.save(Image(moving, affine[[0, 1, 3]][:, [0, 1, 3]]), tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--model", str(checkpoint), "--out", str(out), "--quiet", "--no-report", "--no-cache"])
    assert code == 0
    warped = nib.load(out / "warped.nii.gz").get_fdata()
    expected = inference.register_images(model, io.load(tmp_path / "fixed.nii.gz", squeeze=True), io.load(tmp_path / "moving.nii.gz", squeeze=True), input_shape=(12, 12)).warped
    np.testing.assert_allclose(np.squeeze(warped), np.asarray(expected.data), atol=1e-5)
    record = json.loads((out / "metrics.json").read_text())
    assert record["stages"] == ["network"] and record["negative_jacobian_fraction"] >= 0.0
    # Classical options with --model, and a checkpoint that does not name its network, are errors.
    code = cli.main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--model", str(checkpoint), "--preset", "fast", "--out", str(tmp_path / "o2")])
    assert code == 2 and "--preset" in capsys.readouterr().err
    bare = tmp_path / "bare.ckpt"
    _, state = training.init(model, optax.adam(1e-3))
    training.save_checkpoint(bare, state)
    code = cli.main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--model", str(bare), "--out", str(tmp_path / "o3")])
    assert code == 1 and "does not name its network" in capsys.readouterr().err


def test_mnist_example_learns_on_a_small_fake_archive(tmp_path):
    """examples/mnist_multistep.py end to end on an .npz the test makes (squares as 5s, bars as 7s)."""
    import importlib.util

    rng = np.random.default_rng(0)

    def digits(kind, count):
        images = np.zeros((count, 28, 28), np.uint8)
        for image in images:
            r, c = rng.integers(6, 14, size=2)
            if kind == 5:
                image[r : r + 8, c : c + 8] = 255
            else:
                image[r : r + 12, c : c + 3] = 255
        return images

    x_train = np.concatenate([digits(5, 40), digits(7, 40)])
    y_train = np.array([5] * 40 + [7] * 40, np.uint8)
    x_test = np.concatenate([digits(5, 20), digits(7, 20)])
    y_test = np.array([5] * 20 + [7] * 20, np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    spec = importlib.util.spec_from_file_location("mnist_multistep", os.path.join(os.path.dirname(__file__), "..", "examples", "mnist_multistep.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    assert example.main(["--steps", "120", "--batch", "16", "--lr", "3e-3", "--data", str(tmp_path / "mnist.npz"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fives = metrics["fives"]
    assert fives["ssd_after"] < 0.8 * fives["ssd_before"]
    assert fives["dice_after"] > fives["dice_before"]
    assert 0.0 <= fives["folded_fraction"] < 0.01
    assert len(metrics["sevens"]["five_likeness"]["gain_after_step"]) == 8
    assert metrics["steps_per_second"] > 0 and (out / "sevens.png").stat().st_size > 1000
    # The checkpoint it writes rebuilds the trained network.
    model = training.restore_model(out / "model.ckpt", jnn.build(example.SPEC))
    assert float(jnp.abs(model(jnp.asarray(x_test[0] / 255.0, jnp.float32), jnp.asarray(x_test[1] / 255.0, jnp.float32)).field).max()) > 0.01


def test_import_jaxreg_leaves_flax_until_nn_is_used():
    # A fresh interpreter: this one imported flax above.
    code = textwrap.dedent("""
        import sys
        import jaxreg
        before = "flax" in sys.modules
        unet = jaxreg.nn.UNet
        from jaxreg import nn
        print(before, "flax" in sys.modules, nn is jaxreg.nn, unet is nn.modules.UNet, "nn" in dir(jaxreg))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["False", "True", "True", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        jaxreg.nothing_here  # noqa: B018


@pytest.mark.parametrize(
    "make",
    [
        lambda: jnn.VelocityField(jnn.UNet(2, features=(4, 8), rngs=nnx.Rngs(0))),
        lambda: jnn.AffineHead(2, features=(4, 8), rngs=nnx.Rngs(0)),
        lambda: jnn.TwoStep(jnn.AffineHead(2, features=(4,), rngs=nnx.Rngs(0)), jnn.DisplacementField(jnn.UNet(2, features=(4, 8), rngs=nnx.Rngs(1)))),
        lambda: jnn.Downsampled(jnn.DisplacementField(jnn.UNet(2, features=(4, 8), rngs=nnx.Rngs(0))), factor=2, ndim=2),
    ],
    ids=["unet-velocity", "affine", "two-step", "downsampled"],
)
def test_networks_under_jit_and_vmap_and_their_parameter_gradients(make):
    """Moved off the identity (every parameter perturbed), a network's map is the same
    under jit and eager, under vmap and a loop over pairs, and its gradient with respect
    to the parameters agrees with finite differences."""
    graph, state = training.init(make(), optax.sgd(0.1))
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map(lambda p: p + jnp.asarray(rng.normal(0, 0.05, p.shape), p.dtype), state.params)
    grid = Grid((12, 10))

    def mapped(params, moving, fixed):
        return training.merge(graph, params)(moving, fixed).mapped_points(grid)

    moving = jnp.asarray(rng.random((3, 12, 10)), jnp.float32)
    fixed = jnp.asarray(rng.random((3, 12, 10)), jnp.float32)
    eager = mapped(params, moving[0], fixed[0])
    assert float(jnp.abs(eager - grid.points()).max()) > 1e-3  # off the identity
    np.testing.assert_allclose(jax.jit(mapped)(params, moving[0], fixed[0]), eager, rtol=1e-5, atol=1e-5)
    assert_vmap_matches_loop(lambda m, f: mapped(params, m, f), moving, fixed, rtol=1e-5, atol=1e-5)
    assert_grad_matches_fd(lambda p: jnp.sum(jnp.sin(mapped(p, moving[0], fixed[0]))), params, eps=1e-4, rtol=5e-2, atol=1e-5)


def test_register_images_vmaps_over_pairs_like_a_loop():
    """With a network whose shift depends on the pair, vmap of register_images over pairs
    gives each pair's own world transform and warped image."""
    affine = np.diag([2.0, 3.0, 1.0]).astype(np.float32)
    net = MeanShift((12, 10), 4.0)
    fixed = jnp.stack([_blob_pair((12, 10), seed=s) for s in (0, 1, 2)])
    moving = jnp.stack([_blob_pair((12, 10), seed=s) * g for s, g in ((3, 1.0), (4, 0.5), (5, 1.5))])

    def predict(f, m):
        prediction = inference.register_images(net, Image(f, affine), Image(m, affine), normalize=False)
        return prediction.transform(Image(f, affine).grid.points()), prediction.warped.data

    points, warped = assert_vmap_matches_loop(predict, fixed, moving, atol=1e-5)
    world = Image(fixed[0], affine).grid.points()
    for i in range(3):
        shift = 4.0 * (float(jnp.mean(moving[i])) - float(jnp.mean(fixed[i])))  # voxels on every axis
        np.testing.assert_allclose(points[i], world + jnp.array([2.0, 3.0]) * shift, atol=1e-4)
