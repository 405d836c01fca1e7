"""Traced programs kept on disk, so that a fresh process skips tracing them.

JAX's persistent compilation cache saves the compiling, but not the tracing and lowering
that come before it: each level of a registration is a Python function JAX walks through
again in every process. With the cache warm, a 2-D OASIS ``register`` in a fresh process
still spent most of its compile seconds tracing and lowering. Here a program, once traced,
is kept as a ``jax.export.Exported`` (its StableHLO and calling convention) next to JAX's
cache; the next process lowers that instead of tracing, and JAX's cache supplies the
executable: that ``register`` took 0.59-0.85 s instead of 1.37-1.69 s (levels' compile
seconds 0.20-0.29 against 0.92-1.17; six fresh processes each, in turn), with a
bit-identical result.

A program is kept only when its description (:func:`jaxreg._programs.fingerprint`) says
everything about it that can change between processes: every function it closes over is
code of jaxreg, jax, optax or numpy, every object kept by identity is named there or in
the standard library, and the key includes jaxreg's source, those packages' versions, JAX's
settings and the host facts tracing reads (:func:`_host`). A program built from a user's
own function is traced as before. Files are written atomically; one that cannot be read,
or holds another program, is traced again and replaced. They are pickles: the cache
folder must be the user's own, as JAX's (whose executables run as they are).

The store is on where JAX's persistent cache is (``jax_compilation_cache_dir`` set and
``jax_enable_compilation_cache``): the ``jaxreg`` command turns it on by default.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import os
import pickle
import sys
import types
from pathlib import Path

import jax
import numpy as np

from jaxreg.io import write_bytes

SUBDIRECTORY = "jaxreg-traces"
_FORMAT = 1
_TRUSTED_PACKAGES = ("jaxreg", "jax", "jaxlib", "optax", "numpy")


class _Unstable(Exception):
    """Part of a key is not the same in another process."""


def directory() -> Path | None:
    """Where traced programs are kept: beside JAX's persistent cache, when that is on and
    on a local path; else None."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    cache = jax.config.jax_compilation_cache_dir
    if not cache or "://" in str(cache):
        return None
    return Path(cache) / SUBDIRECTORY


@functools.lru_cache(maxsize=None)
def _trusted_roots() -> tuple[str, ...]:
    # The packages' own folders, not the standard library's: site-packages lies inside it.
    roots = []
    for name in _TRUSTED_PACKAGES:
        module = sys.modules.get(name) or importlib.import_module(name)
        roots.append(os.path.join(os.path.dirname(os.path.abspath(module.__file__)), ""))
    return tuple(roots)


def _trusted_module(name: str | None) -> bool:
    if not name:
        return False
    top = name.split(".")[0]
    return top in _TRUSTED_PACKAGES or top in sys.stdlib_module_names  # builtins is one of these


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    """sha256 of jaxreg's Python sources: a changed helper that a kept program calls (a
    global, which no fingerprint holds) must not find the old program."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _versions() -> tuple:
    import jaxlib
    import optax

    return (sys.version, jax.__version__, jaxlib.__version__, optax.__version__, np.__version__)


def _host() -> tuple:
    # Facts about this machine that jaxreg's tracing reads: a store shared by two hosts
    # (a home directory on NFS) keeps a program per kind of host.
    from jaxreg import sampling

    return (jax.default_backend(), sampling._cpu_vector_gathers())


def _settings() -> tuple:
    # Every JAX setting, so that none that changes a trace (x64, rank promotion, the PRNG
    # implementation, ...) is missed; one without a stable repr cannot be compared. The
    # cache's own settings change no trace (the jaxreg command and a script may differ).
    settings = []
    for name, value in sorted(jax.config.values.items()):
        if "cache" in name:
            continue
        text = repr(value)
        if " at 0x" in text:
            raise _Unstable(f"JAX setting {name}")
        settings.append((name, text))
    return tuple(settings)


def stable_name(obj) -> str | None:
    """``module:qualname`` of a module, class or function that this name finds again in
    another process (one of jaxreg, jax, optax, numpy or the standard library), else
    None."""
    if isinstance(obj, types.ModuleType):
        return f"{obj.__name__}:" if _trusted_module(obj.__name__) else None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not _trusted_module(module) or not isinstance(qualname, str) or "<" in qualname:
        return None
    try:
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is obj else None


def _name_of(obj) -> str:
    # Classes in a key are named without being looked up again: NoneType, for one, is in
    # no module's namespace.
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not _trusted_module(module) or not qualname or "<" in qualname:
        raise _Unstable(f"{obj!r} is not named in a known package")
    return f"{module}:{qualname}"


def _treedef_text(treedef) -> str:
    node = treedef.node_data()
    if node is None:
        return "*"
    kind, aux = node
    aux_text = repr(aux)
    if " at 0x" in aux_text:
        raise _Unstable(f"a {kind.__name__} node's data")
    children = ",".join(_treedef_text(child) for child in treedef.children())
    return f"{_name_of(kind)}[{aux_text}]({children})"


def _feed(digest, part) -> None:
    if isinstance(part, tuple) and len(part) == 3 and part[0] == "identity":
        if part[2] is None:
            raise _Unstable("an object kept by identity has no name")
        digest.update(b"I" + part[2].encode())
    elif isinstance(part, (tuple, list)):
        digest.update(b"(" if isinstance(part, tuple) else b"[")
        for item in part:
            _feed(digest, item)
        digest.update(b")")
    elif isinstance(part, types.CodeType):
        if not os.path.abspath(part.co_filename).startswith(_trusted_roots()):
            raise _Unstable(f"code from {part.co_filename}")
        digest.update(b"C")
        _feed_code(digest, part)
    elif isinstance(part, type):
        digest.update(b"T" + _name_of(part).encode())
    elif isinstance(part, jax.tree_util.PyTreeDef):
        digest.update(b"P" + _treedef_text(part).encode())
    elif isinstance(part, bytes):
        digest.update(b"B%d:" % len(part) + part)
    elif isinstance(part, (type(None), bool, int, float, complex, str, np.dtype)):
        digest.update(b"V" + repr(part).encode() + b";")
    else:
        raise _Unstable(f"a {type(part).__name__} in the key")


def _feed_code(digest, code: types.CodeType) -> None:
    # Not marshal.dumps: its bytes depend on reference counts (whether an object is
    # written once and referred back to), which differ from one process to the next.
    fields = (
        code.co_filename, getattr(code, "co_qualname", code.co_name), code.co_firstlineno, code.co_argcount, code.co_posonlyargcount,
        code.co_kwonlyargcount, code.co_flags, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
    )
    digest.update(repr(fields).encode() + b"B%d:" % len(code.co_code) + code.co_code)
    for const in code.co_consts:
        _feed_constant(digest, const)


def _feed_constant(digest, const) -> None:
    if isinstance(const, types.CodeType):
        digest.update(b"C")
        _feed_code(digest, const)
    elif isinstance(const, (tuple, frozenset)):
        # A frozenset's order follows string hashes, which differ between processes.
        items = const if isinstance(const, tuple) else sorted(const, key=repr)
        digest.update(b"(" if isinstance(const, tuple) else b"{")
        for item in items:
            _feed_constant(digest, item)
        digest.update(b")")
    else:
        digest.update(type(const).__name__.encode() + b":" + repr(const).encode() + b";")


def digest(key) -> str | None:
    """A name for the program ``key`` (from :func:`jaxreg._programs.compiled`) that is the
    same in every process that would trace the same program, or None when part of the key
    cannot promise that."""
    hasher = hashlib.sha256(b"jaxreg traces %d\n" % _FORMAT)
    try:
        _feed(hasher, (key, _source_digest(), _versions(), _host(), _settings()))
    except _Unstable:
        return None
    return hasher.hexdigest()


def _load(path: Path, args):
    try:
        with open(path, "rb") as f:
            stored = pickle.load(f)
        exported = stored["exported"]
        leaves, tree = jax.tree_util.tree_flatten((args, {}))  # export's (args, kwargs)
        shapes = [(tuple(np.shape(leaf)), jax.dtypes.result_type(leaf)) for leaf in leaves]
        if stored.get("format") != _FORMAT or exported.in_tree != tree:
            return None
        if [(tuple(a.shape), a.dtype) for a in exported.in_avals] != shapes:
            return None
        return exported
    except Exception:  # missing, damaged or foreign: trace again (and replace it)
        return None


def lowered(fn, args, key):
    """``jax.jit(fn).lower(*args)``, from the kept trace of an equal program where there
    is one, and keeping the trace where the store is on and ``key`` allows."""
    folder = directory()
    name = digest(key) if folder is not None and key is not None else None
    if name is None:
        return jax.jit(fn).lower(*args)
    path = folder / f"{name}.pkl"
    exported = _load(path, args)
    if exported is not None:
        try:
            return jax.jit(exported.call).lower(*args)
        except Exception:  # a kept program this JAX cannot lower after all: trace again
            pass
    try:
        exported = jax.export.export(jax.jit(fn))(*args)
    except Exception:  # a program export refuses (a host callback): trace as usual
        return jax.jit(fn).lower(*args)
    _store(path, exported)
    return jax.jit(exported.call).lower(*args)


def _store(path: Path, exported) -> None:
    # The vjp closure is not data; these programs are only ever called, not differentiated.
    payload = pickle.dumps({"format": _FORMAT, "exported": dataclasses.replace(exported, _get_vjp=None)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, payload, overwrite=True)
    except OSError:
        pass  # a read-only or full cache: the program still runs, it is just not kept
