"""Compiled programs kept across calls within one process.

``jax.jit`` caches by the identity of the function it wraps. A registration builds its
level programs from closures made afresh on every call (the energy, the optimizer, the
compositive update), so a second ``register`` of the same shapes traced and compiled every
level again: 3.5 s of 15 on a 96x116x128 pair. :func:`fingerprint` describes a function by
what decides the program it traces (its code and, recursively, the values it closes over),
and :func:`compiled` keeps one executable per fingerprint and argument shapes.

A function whose closure holds anything else (an array, an object of a user's class) has no
fingerprint; it is compiled every time, as before. Globals are not part of a fingerprint,
the same as for ``jax.jit``, which also ignores their changes after the first trace.
"""

from __future__ import annotations

import collections
import functools
import types
from typing import Callable

import jax
import numpy as np

from jaxreg import _traces

# Objects compared by identity: they live as long as their module, and the cache entry
# holds a reference besides, so an id is never reused for another object while cached.
_BY_IDENTITY = (types.BuiltinFunctionType, types.ModuleType, type)
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, np.dtype)
_MAX_DEPTH = 24
_MAX_PROGRAMS = 64
_MAX_CONSTANT_SIZE = 4096


class Unkeyable(Exception):
    """Raised by :func:`fingerprint` for a value it cannot describe."""


def fingerprint(obj, *, _seen=None, _depth=0, _keep=None):
    """A hashable description of ``obj``: equal for two closures made by the same code over
    equal values. Raises :class:`Unkeyable` for anything else."""
    if _depth > _MAX_DEPTH:
        raise Unkeyable("nested too deep")
    seen = {} if _seen is None else _seen
    keep = [] if _keep is None else _keep

    def inner(x):
        return fingerprint(x, _seen=seen, _depth=_depth + 1, _keep=keep)

    if isinstance(obj, _PRIMITIVES):
        return (type(obj), obj)
    if isinstance(obj, np.generic):
        return (type(obj), obj.item())
    if id(obj) in seen:  # a closure that reaches itself
        return ("seen", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(inner(x) for x in obj))
    if isinstance(obj, dict):
        return (type(obj), tuple(sorted((repr(k), inner(v)) for k, v in obj.items())))
    if isinstance(obj, functools.partial):
        return ("partial", inner(obj.func), inner(obj.args), inner(obj.keywords))
    if isinstance(obj, types.MethodType):
        return ("method", inner(obj.__func__), inner(obj.__self__))
    if isinstance(obj, types.FunctionType):
        cells = tuple(inner(cell.cell_contents) for cell in obj.__closure__ or ())
        return ("function", obj.__code__, cells, inner(obj.__defaults__), inner(obj.__kwdefaults__))
    if isinstance(obj, _BY_IDENTITY) or _is_jax_callable(obj):
        keep.append(obj)
        # The name, where there is one, lets the key name the program in another process.
        return ("identity", id(obj), _traces.stable_name(obj))
    if isinstance(obj, (np.ndarray, jax.Array)):
        # A small concrete array in a closure is a constant of the program (an affine, a
        # grid's centre): the same values make the same program.
        if isinstance(obj, jax.core.Tracer) or obj.size > _MAX_CONSTANT_SIZE:
            raise Unkeyable(f"cannot describe an array of shape {obj.shape}")
        value = np.asarray(obj)
        return ("array", value.shape, value.dtype.str, value.tobytes())
    leaves, treedef = jax.tree_util.tree_flatten(obj)
    if treedef.num_nodes > 1 or (leaves and leaves[0] is not obj):  # a pytree node (Grid, a transform)
        return ("pytree", treedef, tuple(inner(leaf) for leaf in leaves))
    raise Unkeyable(f"cannot describe a {type(obj).__name__}")


def _is_jax_callable(obj) -> bool:
    # jax.jit-ed functions, custom_jvp/custom_vjp functions: module-level, immutable.
    return callable(obj) and type(obj).__module__.split(".")[0] in ("jax", "jaxlib")


def _argument_key(args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    avals = []
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            raise Unkeyable("traced arguments have no fixed value to compile for")
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            avals.append(fingerprint(leaf))  # a Python number passed as an argument
        else:
            aval = (tuple(leaf.shape), np.dtype(leaf.dtype).str, bool(getattr(leaf, "weak_type", False)))
            # An executable is compiled for its inputs' placement: one split over several
            # devices (register_many's devices=) is part of the key. The sharding has no
            # name that holds in another process, so such a program is never kept on disk.
            sharding = getattr(leaf, "sharding", None)
            if sharding is not None and len(sharding.device_set) > 1:
                aval += (sharding,)
            avals.append(aval)
    return treedef, tuple(avals)


def _config():
    # The settings that change what a trace produces, besides the function and arguments.
    return (jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision), jax.default_backend())


def program_key(fn: Callable, args: tuple, *, keep: list | None = None):
    """What decides the program ``jax.jit(fn)`` traces for ``args``: ``fn``'s fingerprint,
    the arguments' shapes and dtypes, and JAX's settings; None where ``fn`` has no
    fingerprint. Objects it holds by identity are appended to ``keep``."""
    try:
        key = (fingerprint(fn, _keep=keep), _argument_key(args), _config())
        hash(key)
    except (Unkeyable, TypeError):
        return None
    return key


_programs: collections.OrderedDict = collections.OrderedDict()

# XLA CPU's older elemental emitters instead of its MLIR fusion emitters: for programs
# whose run is short next to their compiling. A first 2-D registration of 160x192 OASIS
# slices, four level programs: compile 2.5-3.0 s against 3.6-4.1 s, run the same
# (0.05 s); levels of a 96x116x128 pair: compile 0.4-0.8 s against 0.7-1.1 s a level, run
# 15-30 % slower (0.048 against 0.037 s at shrink 4, 0.75 against 0.58 s at shrink 2).
FAST_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


# XLA GPU tunes a Triton kernel for every matrix product it compiles. For the full-float32
# products of the separable smoothing (grid.PRECISE) that tuning was most of the compile:
# the OASIS 3-D brain-mri registration on an H200 compiled in 12.4 s, 6.2 s with TF32
# products, and 4.9-5.0 s with cuBLAS's products instead (run 0.09 s every way).
GPU_COMPILE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compile_options(fast_compile: bool) -> dict:
    """The XLA options :func:`compiled` compiles with on this backend."""
    backend = jax.default_backend()
    if backend == "gpu":
        return GPU_COMPILE_OPTIONS
    return FAST_COMPILE_OPTIONS if fast_compile and backend == "cpu" else {}


# Programs over fewer voxels than this are compiled for a fast compile rather than a fast
# run: a registration's small levels take milliseconds a step, and compiling them took 15
# to 150 times as long as running them (benchmarks/results/compile.md).
FAST_COMPILE_VOXELS = 2**16


def compiles_fast(voxels: int) -> bool:
    """Whether a program over ``voxels`` voxels is compiled for a fast compile."""
    return voxels < FAST_COMPILE_VOXELS


def traced(args) -> bool:
    """Whether any leaf of ``args`` is a tracer: then there is nothing to compile ahead of
    time, and the caller runs its function inline (under the outer transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args))


def compiled(fn: Callable, args: tuple, *, fast_compile: bool = False):
    """``jax.jit(fn).lower(*args).compile()``, or the executable made for an equal function
    and arguments of the same shapes earlier in this process. Returns ``(executable,
    hit)``. With ``fast_compile``, XLA CPU compiles with :data:`FAST_COMPILE_OPTIONS`
    where it knows them; XLA GPU always compiles with :data:`GPU_COMPILE_OPTIONS`. Where
    JAX's persistent cache is on, the trace is kept across processes too
    (:mod:`jaxreg._traces`)."""
    keep: list = []
    program = program_key(fn, args, keep=keep)
    key = None if program is None else program + (fast_compile,)
    if key is not None and key in _programs:
        _programs.move_to_end(key)
        return _programs[key][0], True
    # The trace does not depend on how it is compiled: one kept trace serves both.
    lowered = _traces.lowered(fn, args, program)
    executable = None
    options = compile_options(fast_compile)
    if options:
        try:
            executable = lowered.compile(compiler_options=options)
        except Exception as err:  # an XLA without the option: compile as usual
            if "compile option" not in str(err):
                raise
    if executable is None:
        executable = lowered.compile()
    if key is not None:
        _programs[key] = (executable, keep)
        while len(_programs) > _MAX_PROGRAMS:
            _programs.popitem(last=False)
    return executable, False


def run(fn: Callable, args: tuple, *, voxels: int):
    """``jax.jit(fn)(*args)``, kept as :func:`compiled` keeps it and compiled for a fast
    compile where ``voxels`` is small (:func:`compiles_fast`); inline under an outer
    transformation. For the eager work around a registration's levels (pyramids, the
    inverse, the final warp) and after it (the pictures, the files ANTs reads)."""
    if traced(args):
        return fn(*args)
    executable, _ = compiled(fn, args, fast_compile=compiles_fast(voxels))
    return executable(*args)


def clear():
    """Forget every kept program."""
    _programs.clear()
