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
    assert len(_programs._programs) == count == 4  # affine and greedy, two levels each
    np.testing.assert_array_equal(np.asarray(again.warped.data), np.asarray(fresh.warped.data))
    # other settings are other programs
    register(images[2], images[3], **options, regularization=0.5)
    assert len(_programs._programs) == count + 2
