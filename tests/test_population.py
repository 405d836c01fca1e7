import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import synthetic
from jaxreg.grid import Grid, Image
from jaxreg.population import build_template, register_many
from jaxreg.registration import register_greedy, register_svf
from jaxreg.transforms import warp

SHAPE = (24, 24)


def _batch(n, seed=0):
    base, _ = synthetic.blobs(jax.random.PRNGKey(seed), SHAPE)
    grid = Grid(SHAPE)
    images = []
    for i in range(n):
        velocity = synthetic.random_velocity(jax.random.PRNGKey(seed + 10 + i), grid, amplitude=2.5, smoothness=8.0)
        images.append(warp(base, velocity))
    return base, jnp.stack(images)


def _options():
    # SGD, not Adam: Adam divides by sqrt(v) and turns the float re-association
    # differences of a batched program into visible noise in flat regions.
    return dict(shrink=(1,), steps=(12,), optimizer=optax.sgd(5.0))


def test_register_many_equals_a_loop_over_pairs():
    base, moving = _batch(3)
    fixed = jnp.broadcast_to(base, moving.shape)
    velocity, losses = register_many(register_svf, fixed, moving, **_options())
    assert velocity.field.shape == (3,) + SHAPE + (2,) and losses[0].shape == (3, 12)
    assert float(jnp.abs(velocity.field).max()) > 0.05
    for i in range(3):
        single, _ = register_svf(Image(base), Image(moving[i]), **_options())
        np.testing.assert_allclose(velocity.field[i], single.field, atol=1e-4)


def test_register_many_in_batches_and_kept_program():
    """batch_size=2 over 3 pairs (a full batch and a remainder) gives the all-at-once
    result, and a second call with equal settings compiles nothing."""
    from jaxreg import _programs

    base, moving = _batch(3)
    fixed = jnp.broadcast_to(base, moving.shape)
    whole, _ = register_many(register_svf, fixed, moving, **_options())
    in_twos, _ = register_many(register_svf, fixed, moving, batch_size=2, **_options())
    np.testing.assert_allclose(in_twos.field, whole.field, atol=1e-4)
    calls = []
    original = _programs.compiled

    def counting(fn, args):
        executable, hit = original(fn, args)
        calls.append(hit)
        return executable, hit

    _programs.compiled = counting
    try:
        again, _ = register_many(register_svf, fixed, moving, batch_size=2, **_options())
    finally:
        _programs.compiled = original
    assert calls == [True]
    np.testing.assert_array_equal(again.field, in_twos.field)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            register_many(register_svf, fixed, moving, batch_size=bad, **_options())


def test_register_many_rejects_bad_batches():
    with pytest.raises(ValueError, match="same shape"):
        register_many(register_svf, jnp.zeros((2, 8, 8)), jnp.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="batch"):
        register_many(register_svf, jnp.zeros((8,)), jnp.zeros((8,)))
    with pytest.raises(ValueError, match="evenly"):
        register_many(register_svf, jnp.ones((3, 8, 8)), jnp.ones((3, 8, 8)), devices=[jax.devices()[0]] * 2)


def test_asking_for_more_devices_than_there_are_is_an_error():
    # It used to run on jax.devices()[:4], i.e. quietly on the one CPU device there is.
    count = len(jax.devices())
    fixed = jnp.ones((2 * (count + 1),) + SHAPE)
    with pytest.raises(ValueError, match=rf"devices={count + 1} asks for {count + 1} devices but only {count} "):
        register_many(register_svf, fixed, fixed, devices=count + 1, **_options())
    for bad, message in ((0, "positive count"), ([], "empty")):
        with pytest.raises(ValueError, match=message):
            register_many(register_svf, fixed, fixed, devices=bad, **_options())
    # as many as there are is fine, and the result lives on them
    velocity, _ = register_many(register_svf, fixed[:count], fixed[:count], devices=count, **_options())
    assert velocity.field.sharding.device_set == set(jax.devices())


def test_sharded_over_four_cpu_devices_equals_one_device():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        from jaxreg import synthetic
        from jaxreg.grid import Grid
        from jaxreg.population import register_many
        from jaxreg.registration import register_greedy
        from jaxreg.transforms import warp
        assert len(jax.devices()) == 4, jax.devices()
        base, _ = synthetic.blobs(jax.random.PRNGKey(0), (24, 24))
        moving = jnp.stack([warp(base, synthetic.random_velocity(jax.random.PRNGKey(i), Grid((24, 24)), amplitude=2.0, smoothness=8.0)) for i in range(4)])
        fixed = jnp.broadcast_to(base, moving.shape)
        options = dict(shrink=(1,), steps=(10,), optimizer=optax.sgd(5.0))
        sharded, _ = register_many(register_greedy, fixed, moving, devices=4, **options)
        single, _ = register_many(register_greedy, fixed, moving, **options)
        assert len(sharded.field.sharding.device_set) == 4, sharded.field.sharding
        assert float(jnp.abs(single.field).max()) > 0.05
        np.testing.assert_allclose(np.asarray(sharded.field), np.asarray(single.field), atol=1e-4)
        # Each device maps over its own share, one pair at a time; the result stays sharded.
        eight_fixed, eight_moving = jnp.concatenate([fixed, fixed]), jnp.concatenate([moving, moving[::-1]])
        traces = []
        def counted(f, m, **kw):
            traces.append(1)
            return register_greedy(f, m, **kw)
        chunked, _ = register_many(counted, eight_fixed, eight_moving, devices=4, batch_size=1, **options)
        assert len(chunked.field.sharding.device_set) == 4, chunked.field.sharding
        expected = np.concatenate([np.asarray(single.field), np.asarray(single.field)[::-1]])
        np.testing.assert_allclose(np.asarray(chunked.field), expected, atol=1e-4)
        # A second call with equal settings runs the kept program: no new trace.
        traced = len(traces)
        again, _ = register_many(counted, eight_fixed, eight_moving, devices=4, batch_size=1, **options)
        assert len(traces) == traced, (traced, len(traces))
        np.testing.assert_array_equal(np.asarray(again.field), np.asarray(chunked.field))
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_template_is_closer_to_the_population_centre_than_the_mean_image():
    base, images = _batch(6, seed=3)
    mean_error = float(jnp.mean((jnp.mean(images, axis=0) - base) ** 2))
    seen = []
    template, velocities = build_template(
        images, stage=register_svf, iterations=2, shrink=(1,), steps=(30,), regularization=0.5,
        callback=lambda i, t: seen.append(i),
    )
    template_error = float(jnp.mean((template.data - base) ** 2))
    assert seen == [0, 1]
    assert velocities.shape == (6,) + SHAPE + (2,)
    # The deformed copies scatter around base; their plain mean is a blur of it.
    assert template_error < 0.6 * mean_error, (template_error, mean_error)
    # The shape update centres the template: the mean velocity is small against each one.
    mean_norm = float(jnp.linalg.norm(jnp.mean(velocities, axis=0), axis=-1).mean())
    each_norm = float(jnp.linalg.norm(velocities, axis=-1).mean())
    assert mean_norm < 0.5 * each_norm


def test_template_needs_a_velocity_stage():
    _, images = _batch(2)
    with pytest.raises(TypeError, match="Velocity"):
        build_template(images, stage=register_greedy, iterations=1, shrink=(1,), steps=(2,))
