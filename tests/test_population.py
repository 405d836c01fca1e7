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
    result, in one program (threads=1) or two concurrent calls (threads=2), and a second
    call with equal settings compiles nothing."""
    from jaxreg import _programs

    base, moving = _batch(3)
    fixed = jnp.broadcast_to(base, moving.shape)
    whole, _ = register_many(register_svf, fixed, moving, batch_size=3, threads=1, **_options())
    original = _programs.compiled
    for threads, programs in ((1, 1), (2, 2)):  # one lax.map program; or chunks of 2 and 1 pairs
        in_twos, _ = register_many(register_svf, fixed, moving, batch_size=2, threads=threads, **_options())
        np.testing.assert_allclose(in_twos.field, whole.field, atol=1e-4)
        calls = []

        def counting(fn, args):
            executable, hit = original(fn, args)
            calls.append(hit)
            return executable, hit

        _programs.compiled = counting
        try:
            again, _ = register_many(register_svf, fixed, moving, batch_size=2, threads=threads, **_options())
        finally:
            _programs.compiled = original
        assert calls == [True] * programs
        np.testing.assert_array_equal(again.field, in_twos.field)
    for name in ("batch_size", "threads"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=name):
                register_many(register_svf, fixed, moving, **{name: bad}, **_options())


@pytest.mark.parametrize(
    "pairs, batch_size, threads, expected",
    [
        (8, None, 1, [(0, 8)]),
        (8, 3, 1, [(0, 3), (3, 5), (5, 8)]),  # ceil(8 / 3) = 3 chunks, sizes within one of each other
        (8, None, 2, [(0, 4), (4, 8)]),
        (8, 3, 2, [(0, 2), (2, 4), (4, 6), (6, 8)]),  # 3 chunks rounded up to a multiple of 2 threads
        (3, 7, 2, [(0, 2), (2, 3)]),
        (2, None, 4, [(0, 1), (1, 2)]),  # never an empty chunk
        (37, 7, 2, [(0, 6), (6, 12), (12, 18), (18, 25), (25, 31), (31, 37)]),
    ],
)
def test_chunks_cover_the_pairs_in_order(pairs, batch_size, threads, expected):
    from jaxreg.population import _chunk_bounds

    bounds = _chunk_bounds(pairs, batch_size, threads)
    assert bounds == expected
    assert len({stop - start for start, stop in bounds}) <= 2


def test_the_plan_on_cpu_and_on_an_accelerator(monkeypatch):
    from jaxreg import population

    monkeypatch.setattr(population, "_usable_cores", lambda: 2)
    # 65536 voxels a call: 7 pairs of 96x96, split so both cores have work
    assert population.plan((8, 96, 96), "cpu") == (7, 2, [(0, 4), (4, 8)])
    assert population.plan((32, 96, 96), "cpu") == (7, 2, [(0, 5), (5, 11), (11, 16), (16, 21), (21, 27), (27, 32)])
    assert population.plan((4, 48, 48, 48), "cpu") == (1, 2, [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert population.plan((1, 96, 96), "cpu") == (7, 1, [(0, 1)])
    assert population.plan((8, 96, 96), "cpu", batch_size=8, threads=1) == (8, 1, [(0, 8)])
    assert population.plan((8, 96, 96), "gpu") == (None, 1, [(0, 8)])  # all at once
    with pytest.raises(ValueError, match="threads"):
        population.plan((8, 96, 96), "cpu", threads=0)


def test_concurrent_calls_run_on_worker_threads_and_keep_the_order(monkeypatch):
    """threads=2 runs the chunk programs from two host threads at once (they overlap in
    time), and the pairs come back in their input order."""
    import threading
    import time

    from jaxreg import _programs

    base, moving = _batch(4)
    fixed = jnp.broadcast_to(base, moving.shape)
    expected, _ = register_many(register_svf, fixed, moving, threads=1, **_options())
    spans, original = [], _programs.compiled

    def slowed(fn, args):
        executable, hit = original(fn, args)

        def run(*inputs):
            start = time.perf_counter()
            out = jax.block_until_ready(executable(*inputs))
            time.sleep(0.2)  # long enough that two sequential calls could not overlap
            spans.append((threading.current_thread().name, start, time.perf_counter()))
            return out

        run.memory_analysis = executable.memory_analysis
        return run, hit

    monkeypatch.setattr(_programs, "compiled", slowed)
    velocity, losses = register_many(register_svf, fixed, moving[::-1], batch_size=1, threads=2, **_options())
    names = {name for name, _, _ in spans}
    assert len(spans) == 4 and len(names) == 2 and all(name.startswith("jaxreg-pairs") for name in names)
    (_, a0, a1), (_, b0, b1) = sorted(spans, key=lambda span: span[1])[:2]
    assert b0 < a1, "the first two calls did not overlap"
    np.testing.assert_allclose(velocity.field, expected.field[::-1], atol=1e-4)
    assert losses[0].shape == (4, 12)


def test_concurrent_jobs_keep_their_order_and_raise_the_first_error():
    import threading
    import time

    from jaxreg.population import _run_concurrently

    started = []

    def job(value, delay):
        def program(x):
            started.append(value)
            time.sleep(delay)
            return x * value

        return program, (jnp.float32(2.0),)

    jobs = [job(v, d) for v, d in ((1, 0.05), (2, 0.0), (3, 0.02), (4, 0.0))]
    assert [float(r) for r in _run_concurrently(jobs, 2)] == [2.0, 4.0, 6.0, 8.0]
    assert sorted(started) == [1, 2, 3, 4]

    def broken(x):
        raise RuntimeError("chunk 1 failed")

    started.clear()
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="chunk 1 failed"):
        _run_concurrently([job(1, 0.0), (broken, (jnp.float32(0.0),))] + [job(v, 0.05) for v in range(5, 12)], 1)
    assert started == [1]  # one thread: nothing after the error started
    assert threading.active_count() <= before  # the pool's threads were kept, no new ones


def test_concurrent_calls_are_limited_by_free_memory(monkeypatch):
    from jaxreg import population

    class Program:
        def memory_analysis(self):
            return type("M", (), dict(temp_size_in_bytes=300, argument_size_in_bytes=50, output_size_in_bytes=50))()

    monkeypatch.setattr(population, "_free_host_memory", lambda: 2000)
    assert population._calls_that_fit(Program(), 8) == 2  # 1000 bytes (half the free) / 400 a call
    monkeypatch.setattr(population, "_free_host_memory", lambda: 100)
    assert population._calls_that_fit(Program(), 8) == 1
    monkeypatch.setattr(population, "_free_host_memory", lambda: None)
    assert population._calls_that_fit(Program(), 8) == 8  # nothing known: as asked
    # register_many falls back to one program and still gives every pair
    monkeypatch.setattr(population, "_free_host_memory", lambda: 1)
    base, moving = _batch(3)
    fixed = jnp.broadcast_to(base, moving.shape)
    velocity, _ = register_many(register_svf, fixed, moving, batch_size=1, threads=3, **_options())
    single, _ = register_svf(Image(base), Image(moving[2]), **_options())
    np.testing.assert_allclose(velocity.field[2], single.field, atol=1e-4)


def test_register_many_under_jit_and_vmap_is_the_eager_result():
    """Under an outer transformation there is nothing to compile ahead or to run on
    threads: the batch is traced inline, one vmap (a lax.map with batch_size)."""
    base, moving = _batch(4)
    fixed = jnp.broadcast_to(base, moving.shape)
    eager, _ = register_many(register_svf, fixed, moving, **_options())
    jitted = jax.jit(lambda f, m: register_many(register_svf, f, m, batch_size=3, **_options())[0].field)(fixed, moving)
    np.testing.assert_allclose(jitted, eager.field, atol=1e-4)
    # vmap over groups of pairs: (2 groups, 2 pairs, ...)
    grouped = jax.vmap(lambda f, m: register_many(register_svf, f, m, **_options())[0].field)(
        fixed.reshape((2, 2) + SHAPE), moving.reshape((2, 2) + SHAPE)
    )
    np.testing.assert_allclose(grouped.reshape(eager.field.shape), eager.field, atol=1e-4)


def test_register_many_rejects_bad_batches():
    with pytest.raises(ValueError, match="same shape"):
        register_many(register_svf, jnp.zeros((2, 8, 8)), jnp.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="batch"):
        register_many(register_svf, jnp.zeros((8,)), jnp.zeros((8,)))
    with pytest.raises(ValueError, match="evenly"):
        register_many(register_svf, jnp.ones((3, 8, 8)), jnp.ones((3, 8, 8)), devices=[jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="threads=2 does not combine with devices"):
        register_many(register_svf, jnp.ones((2, 8, 8)), jnp.ones((2, 8, 8)), devices=1, threads=2)


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
