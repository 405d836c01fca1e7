"""Traced programs kept across processes (jaxreg._traces)."""

import functools
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import _programs, _traces
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Image
from jaxreg.losses import similarity
from jaxreg.registration import register


def _pair(shape=(12, 10)):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))


_DIGEST_IN_A_FRESH_INTERPRETER = """
import jax.numpy as jnp
from jaxreg import _programs, _traces
from jaxreg.losses import similarity
args = (jnp.zeros((12, 10)), jnp.zeros((12, 10)))
print(_traces.digest(_programs.program_key(similarity.lncc(radius=2), args)))
"""


def test_a_program_has_the_same_name_in_every_process():
    names = set()
    for seed in ("1", "2"):  # str hashes differ between the two interpreters
        env = dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        run = subprocess.run([sys.executable, "-c", _DIGEST_IN_A_FRESH_INTERPRETER], env=env, capture_output=True, text=True, check=True)
        names.add(run.stdout.strip().splitlines()[-1])
    here = _traces.digest(_programs.program_key(similarity.lncc(radius=2), _pair()))
    assert names == {here} and len(here) == 64


_REGISTER_IN_A_FRESH_INTERPRETER = """
import sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
import jax.numpy as jnp
import numpy as np
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Image
from jaxreg.registration import register

traced = []
export = jax.export.export
jax.export.export = lambda *a, **k: (traced.append(1), export(*a, **k))[1]
rng = np.random.default_rng(5)
fixed, moving = (Image(gaussian_smooth(jnp.asarray(rng.standard_normal((24, 20)), jnp.float32), 2.0) + 3.0) for _ in range(2))
result = register(fixed, moving, shrink=(2, 1), steps=(3, 2), affine_options=dict(shrink=(2, 1), steps=(3, 2)))
print(len(traced), float(jnp.sum(result.warped.data)))
"""


def test_a_second_process_traces_nothing_and_adds_no_file(tmp_path):
    # Two fresh interpreters, as two runs of the jaxreg command: the keys must not depend on
    # anything that differs between processes (object addresses, str hashes, or the bytes
    # marshal writes, which follow reference counts).
    runs = []
    for seed in ("3", "4"):
        env = dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        done = subprocess.run([sys.executable, "-c", _REGISTER_IN_A_FRESH_INTERPRETER, str(tmp_path)],
                              env=env, capture_output=True, text=True, check=True)
        traced, total = done.stdout.split()
        runs.append((int(traced), float(total), len(list((tmp_path / "jaxreg-traces").iterdir()))))
    (first_traced, first_total, kept), (again_traced, again_total, kept_after) = runs
    assert first_traced == kept == 8
    assert again_traced == 0 and kept_after == kept
    assert again_total == first_total


def _user_function(a, b):
    return a * b


def test_only_programs_made_of_known_code_are_named(monkeypatch):
    args = _pair()
    lncc = _traces.digest(_programs.program_key(similarity.lncc(radius=2), args))
    assert lncc is not None
    assert _traces.digest(_programs.program_key(similarity.lncc(radius=3), args)) != lncc
    assert _traces.digest(_programs.program_key(similarity.lncc(radius=2), _pair((12, 11)))) != lncc
    # this file's code may change between two runs without anything in the key changing
    assert _traces.digest(_programs.program_key(_user_function, args)) is None
    wrapped = jax.jit(_user_function)
    assert _traces.digest(_programs.program_key(lambda a, b: wrapped(a, b), args)) is None
    # so may jaxreg's own sources (a helper a program calls is a global, not in the key)
    monkeypatch.setattr(_traces, "_source_digest", lambda: "edited")
    assert _traces.digest(_programs.program_key(similarity.lncc(radius=2), args)) not in (None, lncc)


def test_stable_names_find_the_object_again():
    assert _traces.stable_name(jnp.exp) == f"{jnp.exp.__module__}:{jnp.exp.__qualname__}"
    assert _traces.stable_name(np.float32) == "numpy:float32"
    assert _traces.stable_name(jax.jit(_user_function)) is None  # not in a known package
    assert _traces.stable_name(jax.jit(lambda x: x)) is None


@pytest.fixture
def store(tmp_path, monkeypatch):
    folder = tmp_path / "traces"
    monkeypatch.setattr(_traces, "directory", lambda: folder)
    _programs.clear()
    yield folder
    _programs.clear()


def _no_tracing(*args, **kwargs):
    raise AssertionError("traced again")


def test_a_kept_program_is_lowered_without_tracing_and_computes_the_same(store, monkeypatch):
    fn, args = similarity.lncc(radius=2), _pair()
    first, hit = _programs.compiled(fn, args)
    assert not hit and len(list(store.iterdir())) == 1
    expected = np.asarray(first(*args))
    np.testing.assert_allclose(expected, np.asarray(jax.jit(fn)(*args)), rtol=1e-6)
    _programs.clear()  # as in a fresh process
    monkeypatch.setattr(jax.export, "export", _no_tracing)
    again, hit = _programs.compiled(fn, args)
    assert not hit
    np.testing.assert_array_equal(np.asarray(again(*args)), expected)
    # the fast-compiled variant shares the trace
    fast, _ = _programs.compiled(fn, args, fast_compile=True)
    np.testing.assert_allclose(np.asarray(fast(*args)), expected, rtol=1e-6)
    assert len(list(store.iterdir())) == 1


def test_a_damaged_or_foreign_file_is_traced_again_and_replaced(store):
    fn, args = similarity.lncc(radius=2), _pair()
    expected = np.asarray(jax.jit(fn)(*args))
    _programs.compiled(fn, args)
    (path,) = store.iterdir()
    path.write_bytes(b"not a pickle")
    _programs.clear()
    run, _ = _programs.compiled(fn, args)
    np.testing.assert_allclose(np.asarray(run(*args)), expected, rtol=1e-6)
    assert pickle.loads(path.read_bytes())["format"] == _traces._FORMAT
    # a file holding another program (in the same place) is not used for this one
    _programs.compiled(functools.partial(gaussian_smooth, sigma=1.0), (args[0],))
    other_path = next(p for p in store.iterdir() if p != path)
    path.write_bytes(other_path.read_bytes())
    _programs.clear()
    run, _ = _programs.compiled(fn, args)
    np.testing.assert_allclose(np.asarray(run(*args)), expected, rtol=1e-6)


def test_an_unwritable_store_keeps_nothing_and_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(_traces, "directory", lambda: blocker / "traces")
    _programs.clear()
    fn, args = similarity.lncc(radius=2), _pair()
    run, _ = _programs.compiled(fn, args)
    np.testing.assert_allclose(np.asarray(run(*args)), np.asarray(jax.jit(fn)(*args)), rtol=1e-6)
    assert blocker.read_text() == ""
    _programs.clear()


def test_register_from_kept_traces_traces_nothing_and_gives_the_same_result(store, monkeypatch):
    rng = np.random.default_rng(4)
    fixed, moving = (Image(gaussian_smooth(jnp.asarray(rng.standard_normal((40, 36)), jnp.float32), 2.0) + 3.0) for _ in range(2))
    options = dict(shrink=(2, 1), steps=(4, 3), affine_options=dict(shrink=(2, 1), steps=(4, 3)))
    first = register(fixed, moving, **options)
    kept = len(list(store.iterdir()))
    assert kept == 8  # the level and helper programs of test_programs' count
    _programs.clear()
    jax.clear_caches()
    monkeypatch.setattr(jax.export, "export", _no_tracing)
    again = register(fixed, moving, **options)
    np.testing.assert_array_equal(np.asarray(again.warped.data), np.asarray(first.warped.data))
    for a, b in zip(jax.tree_util.tree_leaves(again.transform), jax.tree_util.tree_leaves(first.transform), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(list(store.iterdir())) == kept


def test_the_store_is_on_where_jax_persistent_cache_is(tmp_path):
    saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert _traces.directory() is None
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert _traces.directory() == tmp_path / "jaxreg-traces"
        jax.config.update("jax_enable_compilation_cache", False)
        assert _traces.directory() is None
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")
        assert _traces.directory() is None
    finally:
        jax.config.update("jax_enable_compilation_cache", saved[0])
        jax.config.update("jax_compilation_cache_dir", saved[1])
