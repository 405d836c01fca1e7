import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import _programs
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Grid, Image
from jaxreg.losses import similarity
from jaxreg.registration import register


def _scaled_by(factor):
    def f(x):
        return x * factor

    return f


class _Opaque:
    pass


def test_fingerprint_equal_for_equal_closures_and_different_otherwise():
    fp = _programs.fingerprint
    assert fp(_scaled_by(2.0)) == fp(_scaled_by(2.0))
    assert fp(_scaled_by(2.0)) != fp(_scaled_by(3.0))
    assert fp(similarity.lncc(radius=2)) == fp(similarity.lncc(radius=2))
    assert fp(similarity.lncc(radius=2)) != fp(similarity.lncc(radius=3))
    # small concrete arrays and pytrees (a Grid) count by value
    assert fp(_scaled_by(jnp.eye(3))) == fp(_scaled_by(np.eye(3, dtype=np.float32)))
    assert fp(_scaled_by(Grid((4, 5)))) == fp(_scaled_by(Grid((4, 5))))
    assert fp(_scaled_by(Grid((4, 5)))) != fp(_scaled_by(Grid((4, 6))))


@pytest.mark.parametrize("captured", [jnp.zeros((100, 100)), _Opaque()])
def test_fingerprint_refuses_large_arrays_and_unknown_objects(captured):
    with pytest.raises(_programs.Unkeyable):
        _programs.fingerprint(_scaled_by(captured))


def test_a_closure_that_reaches_itself_has_a_fingerprint():
    def outer():
        def again(n):
            return 0 if n == 0 else again(n - 1)

        return again

    assert _programs.fingerprint(outer()) == _programs.fingerprint(outer())


def test_compiled_reuses_equal_programs_and_not_unkeyable_ones():
    _programs.clear()
    x = jnp.arange(4.0)
    run, hit = _programs.compiled(_scaled_by(2.0), (x,))
    assert not hit and np.allclose(run(x), 2 * x)
    run, hit = _programs.compiled(_scaled_by(2.0), (x + 1,))
    assert hit and np.allclose(run(x + 1), 2 * (x + 1))
    assert not _programs.compiled(_scaled_by(3.0), (x,))[1]
    assert not _programs.compiled(_scaled_by(2.0), (jnp.arange(5.0),))[1]  # another shape
    opaque = _scaled_by(jnp.ones((100, 100)))
    assert not _programs.compiled(opaque, (jnp.ones((100, 100)),))[1]
    assert not _programs.compiled(opaque, (jnp.ones((100, 100)),))[1]


def test_second_register_of_the_same_shapes_compiles_nothing_and_gives_the_same_result():
    rng = np.random.default_rng(0)
    images = [Image(gaussian_smooth(jnp.asarray(rng.standard_normal((40, 36)), jnp.float32), 2.0) + 3.0) for _ in range(4)]
    options = dict(shrink=(2, 1), steps=(4, 3), affine_options=dict(shrink=(2, 1), steps=(4, 3)))
    _programs.clear()
    fresh = register(images[2], images[3], **options)
    _programs.clear()
    register(images[0], images[1], **options)
    count = len(_programs._programs)
    again = register(images[2], images[3], **options)
    # affine and greedy, two levels each; around them the pyramid level (both images the
    # same shape), the field carried to the finer level, the inverse and the final warp
    assert len(_programs._programs) == count == 4 + 4
    np.testing.assert_array_equal(np.asarray(again.warped.data), np.asarray(fresh.warped.data))
    # other settings are other programs
    register(images[2], images[3], **options, regularization=0.5)
    assert len(_programs._programs) == count + 2


def _smoothed_squares(x):
    return jnp.sum(gaussian_smooth(x, 1.5) ** 2, axis=-1)


def test_fast_compile_is_the_same_function_kept_apart_and_optional(monkeypatch):
    _programs.clear()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((24, 20)), jnp.float32)
    expected = np.sum(np.asarray(gaussian_smooth(x, 1.5)) ** 2, axis=-1)
    default, _ = _programs.compiled(_smoothed_squares, (x,))
    fast, hit = _programs.compiled(_smoothed_squares, (x,), fast_compile=True)
    assert not hit and fast is not default  # its own entry, not the default program
    np.testing.assert_allclose(fast(x), expected, rtol=1e-5)
    np.testing.assert_allclose(default(x), expected, rtol=1e-5)
    assert _programs.compiled(_smoothed_squares, (x,), fast_compile=True) == (fast, True)
    # an XLA that does not know the option: compiled as usual, not an error
    monkeypatch.setattr(_programs, "FAST_COMPILE_OPTIONS", {"xla_cpu_no_such_option_here": True})
    _programs.clear()
    plain, _ = _programs.compiled(_smoothed_squares, (x,), fast_compile=True)
    np.testing.assert_allclose(plain(x), expected, rtol=1e-5)


def test_a_gpu_compiles_every_program_with_cublas_products(monkeypatch):
    # GPU_COMPILE_OPTIONS cut the OASIS 3-D compile on an H200 from 12.4 to 5.0 s; here the
    # choice of options and that they reach the compiler (XLA CPU knows the flag too).
    assert _programs.compile_options(False) == {} and _programs.compile_options(True) == _programs.FAST_COMPILE_OPTIONS
    seen = []
    compile_ = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, **kw: (seen.append(kw.get("compiler_options")), compile_(self, **kw))[1])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _programs.compile_options(True) == _programs.compile_options(False) == {"xla_gpu_enable_triton_gemm": False}
    _programs.clear()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((24, 20)), jnp.float32)
    program, _ = _programs.compiled(_smoothed_squares, (x,))
    assert seen == [_programs.GPU_COMPILE_OPTIONS]
    np.testing.assert_allclose(program(x), np.sum(np.asarray(gaussian_smooth(x, 1.5)) ** 2, axis=-1), rtol=1e-5)
    _programs.clear()


def test_register_compiles_small_levels_fast_and_large_ones_for_speed(monkeypatch):
    calls = []
    keep = _programs.compiled
    monkeypatch.setattr(_programs, "compiled", lambda fn, args, fast_compile=False: (calls.append(fast_compile), keep(fn, args, fast_compile=fast_compile))[1])
    rng = np.random.default_rng(2)
    fixed, moving = (Image(gaussian_smooth(jnp.asarray(rng.standard_normal((40, 36)), jnp.float32), 2.0) + 3.0) for _ in range(2))
    options = dict(preset="fast", affine=None, shrink=(2, 1), steps=(2, 2))
    monkeypatch.setattr(_programs, "FAST_COMPILE_VOXELS", 20 * 18 + 1)  # the shrink-2 level only
    register(fixed, moving, **options)
    levels = calls[:]
    # levels coarse to fine (the pyramid level of the full image between them), then the
    # inverse and the final warp on the full grid
    assert levels[0] is False and True in levels and levels[-1] is False
    calls.clear()
    monkeypatch.setattr(_programs, "FAST_COMPILE_VOXELS", 0)
    register(fixed, moving, **options)
    assert calls and not any(calls)


def test_first_register_compiles_a_dozen_programs_and_no_eager_operation():
    import jax

    rng = np.random.default_rng(3)
    images = [Image(gaussian_smooth(jnp.asarray(rng.standard_normal((40, 36)), jnp.float32), 2.0) + 3.0) for _ in range(2)]
    compiles = []

    def listen(name, seconds, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.clear_caches()
        _programs.clear()
        register(images[0], images[1], shrink=(2, 1), steps=(4, 3), affine_options=dict(shrink=(2, 1), steps=(4, 3)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    # 4 levels; the pyramid level, the field carried up, the inverse and the final warp;
    # the intensity rescaling, the affine stage's frame, its parameters to a matrix and the
    # matrix inverse. Each eager array operation is a program of its own: there were 52.
    assert 8 <= len(compiles) <= 12
