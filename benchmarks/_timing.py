"""Shared benchmark helpers: one timing protocol for JAX, torch and numpy/scipy callables.

Protocol: ``warmup`` untimed calls, then ``n`` timed calls, each ended by blocking on its
result (``block_until_ready`` on every JAX array, ``torch.cuda.synchronize`` where a result
is a CUDA tensor; torch and numpy on CPU are synchronous).
JAX functions are compiled ahead of time (``jax.jit(f).lower(*args).compile()``), and
that is timed separately as the compile time, tracing included.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import jax
import numpy as np


@dataclass
class Timing:
    median_s: float
    min_s: float
    n: int
    times_s: list = field(default_factory=list)
    compile_s: float | None = None
    temp_bytes: int | None = None  # XLA's scratch memory for the compiled program


def block(out):
    """Wait until every JAX array and CUDA tensor in ``out`` is computed; other leaves pass
    through. torch queues CUDA kernels and returns at once, so a timed call that did not
    synchronise would measure the queueing only."""
    cuda = []

    def wait(a):
        if isinstance(a, jax.Array):
            a.block_until_ready()
        elif getattr(a, "is_cuda", False) is True:
            cuda.append(a.device)
        return a

    # Tuples and lists of tensors are pytrees; a tensor itself is a leaf.
    jax.tree_util.tree_map(wait, out)
    if cuda:
        sys.modules["torch"].cuda.synchronize(cuda[0])
    return out


def torch_device(choice: str = "auto") -> str:
    """The device torch peers run on: ``'cuda'`` for ``'auto'`` where torch sees a GPU,
    else ``'cpu'``; ``'cuda'`` asked for where there is none is an error, not a silent CPU
    run."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"torch device must be auto, cpu or cuda; got {choice!r}")
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            return "cpu"
    available = bool(torch.cuda.is_available())
    if choice == "cuda" and not available:
        raise ValueError("--torch-device cuda: torch sees no CUDA device here")
    return "cuda" if choice == "cuda" or (choice == "auto" and available) else "cpu"


def accelerator() -> str | None:
    """The accelerator JAX computes on (``'NVIDIA H200'``), or None on a CPU backend; for
    result file names and the machine line."""
    if jax.default_backend() == "cpu":
        return None
    return jax.devices()[0].device_kind


def results_suffix() -> str:
    """``'-gpu'`` where JAX runs on a GPU (``'-tpu'``, ...), else ``''``: a suite run there writes
    ``kernels-gpu.json`` beside the CPU run's ``kernels.json`` instead of replacing it."""
    backend = jax.default_backend()
    return "" if backend == "cpu" else f"-{backend}"


def time_calls(fn, n: int, warmup: int = 1):
    """Median and min wall time of ``n`` calls of ``fn()`` after ``warmup`` calls."""
    out = None
    for _ in range(warmup):
        out = block(fn())
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = block(fn())
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), n, times), out


def compile_jax(f, *args):
    """``(call, compile_s, temp_bytes)``: ``f`` compiled ahead of time for ``args`` (timed,
    tracing included), a zero-argument ``call`` running it, and XLA's scratch bytes."""
    start = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    compile_s = time.perf_counter() - start
    try:
        temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        temp_bytes = None
    return (lambda: compiled(*args)), compile_s, temp_bytes


def time_jax(f, *args, n: int, warmup: int = 1):
    """Compile ``f`` for ``args`` (timed), then time the compiled program as :func:`time_calls`."""
    call, compile_s, temp_bytes = compile_jax(f, *args)
    timing, out = time_calls(call, n, warmup)
    timing.compile_s, timing.temp_bytes = compile_s, temp_bytes
    return timing, out


# How rotated rounds are described on the result pages (:func:`time_in_rounds`).
ROTATION_NOTE = (
    "each round starts one implementation later, so that none always runs right after the same peer "
    "(torch's OpenMP threads keep spinning for a while after a call and slow down whatever runs next)"
)
RETAINED_NOTE = ("`jaxreg.retain_host_memory()` before the first computation (`--retain-host-memory`): "
                 "glibc keeps freed memory in the process for every implementation here, torch's and scipy's too, "
                 "up to 2 GiB, so a call does not fault its temporaries in afresh (beyond 2 GiB it still does)")


def time_in_rounds(calls, n: int, *, rotate: bool = True):
    """Wall times of ``n`` rounds that call every one of ``calls`` once, in turn.

    Timing one implementation's calls after another's lets a slow spell of a shared machine
    land on one of them only; in rounds it lands on all alike, so their ratio holds. With
    ``rotate`` each round starts one place later, so that no implementation always runs
    right after the same other one: a peer whose worker threads keep spinning for a while
    after it returns (OpenMP, ITK) would otherwise slow down the same neighbour every time.
    Returns one list of ``n`` times per callable, in the order given; warm-up is the
    caller's.
    """
    times = [[] for _ in calls]
    for round_ in range(n):
        start_at = round_ % len(calls) if rotate and calls else 0
        for j in range(start_at, start_at + len(calls)):
            call, spent = calls[j % len(calls)], times[j % len(calls)]
            start = time.perf_counter()
            block(call())
            spent.append(time.perf_counter() - start)
    return times


def memory_bandwidth(megabytes: int = 512, repeats: int = 3) -> dict:
    """Copy bandwidth of numpy: ``2 * nbytes / best time`` (one read and one write per byte)."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(time_calls(lambda: np.copyto(dst, src), repeats, warmup=1)[0].times_s)
    return {
        "gb_per_s": 2 * src.nbytes / best / 1e9,
        "method": f"numpy.copyto of a {megabytes} MiB float32 array, best of {repeats}; "
        "GB/s = 2 * nbytes / time (read + write, write-allocate traffic not counted)",
    }


def device_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict | None:
    """Where JAX computes on an accelerator, its memory bandwidth as a jitted ``x * 2`` of a
    ``megabytes`` float32 array sees it (``2 * nbytes / best time``); None on the CPU
    backend, whose bandwidth :func:`memory_bandwidth` gives."""
    if jax.default_backend() == "cpu":
        return None
    x = jax.numpy.ones(megabytes * 2**20 // 4, jax.numpy.float32)
    double = jax.jit(lambda a: a * 2.0)
    best = min(time_calls(lambda: double(x), repeats, warmup=2)[0].times_s)
    return {
        "gb_per_s": 2 * x.nbytes / best / 1e9,
        "device": accelerator(),
        "method": f"jitted x * 2 of a {megabytes} MiB float32 array on {accelerator()}, best of {repeats}; "
        "GB/s = 2 * nbytes / time",
    }


_DISPATCH_PROBE = r"""
import json, sys, time
import jax
jax.config.update("jax_cpu_enable_async_dispatch", sys.argv[1] == "async")
import jax.numpy as jnp
import numpy as np
from jaxreg.sampling import sample

def median_s(fn, *args, calls=400):
    fn(*args).block_until_ready()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))

rng = np.random.default_rng(0)
image = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
points = np.stack(np.meshgrid(np.arange(64), np.arange(64), indexing="ij"), -1)
coords = jnp.asarray(points + rng.uniform(-2, 2, points.shape), jnp.float32)
add_one = jax.jit(lambda x: x + 1).lower(jnp.float32(0)).compile()
warp = jax.jit(lambda i, c: sample(i, c, order=1, mode="constant")).lower(image, coords).compile()
print(json.dumps({"empty_s": median_s(add_one, jnp.float32(0)), "warp_64_s": median_s(warp, image, coords)}))
"""


def dispatch_floor() -> dict:
    """What one call of a compiled JAX program costs beyond its work: the median round trip
    of a jitted ``x + 1`` on one float32, and of jaxreg's 64x64 linear warp, with JAX's
    asynchronous CPU dispatch (the default: the program runs on another thread, which the
    caller wakes and waits for) and without it (``jax_cpu_enable_async_dispatch=False``:
    it runs on the calling thread, as torch's eager calls do). Each in a fresh process,
    since the setting is read when the CPU client starts. None where JAX computes on an
    accelerator: the probe measures the CPU client."""
    if jax.default_backend() != "cpu":
        return None
    result = {"method": "median of 400 calls each ended by block_until_ready, one fresh process per mode"}
    for mode in ("async", "sync"):
        try:
            run = subprocess.run([sys.executable, "-c", _DISPATCH_PROBE, mode], capture_output=True, text=True, timeout=300, check=True)
            result[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as err:
            result[mode] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return result


def dispatch_text(dispatch: dict | None) -> str | None:
    """One sentence on :func:`dispatch_floor`'s numbers, for the kernel pages."""
    if not dispatch or "empty_s" not in dispatch.get("async", {}) or "empty_s" not in dispatch.get("sync", {}):
        return None
    a, s = dispatch["async"], dispatch["sync"]
    return (
        f"JAX dispatch on this host ({dispatch['method']}): a jitted `x + 1` on one float32 takes "
        f"{a['empty_s'] * 1e3:.3f} ms with JAX's asynchronous CPU dispatch (the default, used for every row here: "
        "the program runs on another thread, which the caller wakes and waits for) and "
        f"{s['empty_s'] * 1e3:.3f} ms with `jax_cpu_enable_async_dispatch=False` (run on the calling thread, as "
        f"torch's eager calls are); jaxreg's 64×64 warp fwd takes {a['warp_64_s'] * 1e3:.3f} ms and "
        f"{s['warp_64_s'] * 1e3:.3f} ms. At the smallest sizes the JAX rows measure this round trip more than "
        "the kernel."
    )


def cpu_description(cpuinfo: str) -> dict:
    """Model name, family and model number, and widest vector ISA of the first CPU in a
    ``/proc/cpuinfo`` text. The name alone ("AMD EPYC") can hide hosts whose gathers differ
    2x in speed (AVX-512 or not; see ``jaxreg.sampling._values_read_patches``)."""
    first = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if first:
                break
            continue
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = set(first.get("flags", "").split())
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse/other" if flags else ""
    return {"cpu_model": first.get("model name", ""), "cpu_family": first.get("cpu family", ""),
            "cpu_model_number": first.get("model", ""), "cpu_isa": isa}


def cpu_label(machine: dict) -> str:
    """``AMD EPYC (family 26 model 2, avx512f)`` from a :func:`machine_info` record; older
    records without family and ISA give the name alone."""
    name = machine.get("cpu_model") or machine.get("processor") or "?"
    detail = []
    if machine.get("cpu_family"):
        detail.append(f"family {machine['cpu_family']} model {machine.get('cpu_model_number', '?')}")
    if machine.get("cpu_isa"):
        detail.append(machine["cpu_isa"])
    return f"{name} ({', '.join(detail)})" if detail else name


def machine_info() -> dict:
    info = {
        "processor": platform.processor(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "numpy": np.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info.update(cpu_description(f.read()))
    except OSError:
        pass
    for module in ("jaxlib", "torch", "scipy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    info["jax_device_kind"] = accelerator()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    return info


def code_version(repo: str) -> dict:
    """Commit of ``repo`` and its uncommitted files under jaxreg/ (what was measured)."""

    def git(*args):
        try:
            return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    if os.environ.get("JAXREG_COMMIT"):
        # A copy of the working tree sent to a GPU machine (benchmarks/device_run.sh): the
        # commit it was copied at, as the sender says. Its .git, where one came along, was
        # seen to be older than the tree (HEAD 880b9f4 under a tree of c5a24d7).
        return {"commit": os.environ["JAXREG_COMMIT"], "uncommitted": [], "commit_from": "JAXREG_COMMIT"}
    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "uncommitted": git("status", "--porcelain", "--", "jaxreg").splitlines()}


def code_line(result: dict, *, total: bool = True) -> str:
    """The results page's "- code:" line: the commit (and files changed beside it), the
    load average at start and end, and (with ``total``) the seconds the run took."""
    code = result["code"]
    dirty = f", uncommitted: {' '.join(line.split()[-1] for line in code['uncommitted'])}" if code["uncommitted"] else ""
    line = (f"- code: jaxreg at {code['commit'][:10] or '?'}{dirty}; load average (1 min) "
            f"{result['load_average_start'][0]:.1f} at start, {result['load_average_end'][0]:.1f} at end")
    return line + (f"; total {result['total_s']:.0f} s" if total else "")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def optional(value, spec: str) -> str:
    """``format(value, spec)``, or an empty cell for None."""
    return "" if value is None else format(value, spec)


def milliseconds(seconds) -> str:
    """Seconds as milliseconds with 3-4 significant digits; empty for None."""
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"
