"""Compile time next to run time: jaxreg's registration programs and its kernels.

    python benchmarks/compile.py                 # full sizes (a few minutes on 2 cores)
    python benchmarks/compile.py --quick         # inputs downsampled by 2, small kernel sizes
    python benchmarks/compile.py --only kernels --out /tmp/compile

Writes ``compile.json`` and ``compile.md`` into ``--out`` (default ``benchmarks/results``)
and prints the Markdown. Two parts:

- ``register``: ``jaxreg.register(fixed, moving)`` (preset ``brain-mri``) on the brain2mm
  pair (96×116×128, 2 mm) and on the 2-D OASIS slices 0001→0002 (160×192), each case in a
  fresh Python process with JAX's persistent compilation cache off, called twice in that
  process. Every pyramid level is one jitted program, compiled ahead of time by
  ``register`` (``Result.compile_seconds`` / ``Result.run_seconds``, named by
  ``Result.stages``). The per-level split is read by wrapping
  ``jaxreg.registration._run_level`` in the worker (benchmark-only instrumentation: the
  wrapper adds the clock's increments of each call to a list); where that private
  function is missing only the totals are reported.
- ``kernels``: ``jax.jit(f).lower(*args).compile()`` timed (tracing included) next to the
  median run time of the compiled program (1 warm-up call, then N timed calls, each ended
  by ``block_until_ready``): linear warp forward, warp forward + gradient, composition of
  two displacements, SVF exponential (7 squarings), LNCC (box, radius 4) forward + gradient,
  Gaussian smoothing (sigma 2). Each case is a fresh Python closure, so no trace is reused.

**runs to amortise** = compile s / run s: how many calls of the program cost as much as
compiling it once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._paths import REPO, RESULTS as DEFAULT_OUT, SHARED_DATA as DEFAULT_DATA, repo_env, work_folder  # noqa: E402

PARTS = ("register", "kernels")
CASES = ("brain2mm", "oasis2d")
QUICK_FACTOR = 2
KERNEL_SIZES = [(256, 256), (64, 64, 64), (128, 128, 128), (160, 192, 224)]
KERNEL_SIZES_QUICK = [(64, 64), (32, 32, 32)]
CASE_TEXT = {
    "brain2mm": "FireANTs' brains `atlas_2mm_1001_3` → `atlas_2mm_1000_3` (96×116×128, 2 mm)",
    "oasis2d": "OASIS `slice_norm` 0001 → 0002 (160×192)",
}


# ============================================================================ register


def _worker(case: str, data: str, factor: int, out: str) -> int:
    """In a fresh process: register the case's pair twice; write the timings to ``out``."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import jax.numpy as jnp

    from benchmarks._timing import block
    from benchmarks.pairwise import case_pairs
    from jaxreg import _programs, registration
    from jaxreg.grid import Image

    pair = [p for p in case_pairs(case, data, factor)][0]
    fixed = Image(jnp.asarray(pair.fixed), jnp.asarray(pair.fixed_affine))
    moving = Image(jnp.asarray(pair.moving), jnp.asarray(pair.moving_affine))
    block((fixed, moving))

    levels: list[tuple[float, float, bool | None]] = []
    original = getattr(registration, "_run_level", None)
    if original is not None:
        compiles_fast = getattr(_programs, "compiles_fast", None)

        def timed_level(fn, args, clock, **options):
            before = (clock.compile_seconds, clock.run_seconds) if clock is not None else None
            result = original(fn, args, clock, **options)
            if before is not None and not clock.traced:
                voxels = options.get("voxels")
                fast = None if compiles_fast is None or voxels is None else compiles_fast(voxels)
                levels.append((clock.compile_seconds - before[0], clock.run_seconds - before[1], fast))
            return result

        registration._run_level = timed_level

    calls = []
    for call in range(2):
        levels.clear()
        start = time.perf_counter()
        result = block(registration.register(fixed, moving))
        wall = time.perf_counter() - start
        stages = list(result.stages)
        per_level = None
        if len(levels) == len(stages):
            per_level = [dict(stage=s, compile_s=c, run_s=r, fast_compile=fast) for s, (c, r, fast) in zip(stages, levels)]
        calls.append(dict(call=call + 1, wall_s=wall, compile_s=result.compile_seconds, run_s=result.run_seconds,
                          stages=stages, levels=per_level))
    record = dict(case=case, direction=pair.direction, shape=list(pair.fixed.shape), factor=factor,
                  preset="brain-mri", jax=jax.__version__, calls=calls)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


def run_register(case: str, args) -> dict:
    """One case in a fresh process (``--worker``); its record, or a skip / error note."""
    from benchmarks.pairwise import case_pairs

    factor = QUICK_FACTOR if args.quick else 1
    try:
        case_pairs(case, args.data, factor)  # cheap check that the files exist
    except FileNotFoundError as e:
        return {"case": case, "skipped": str(e)}
    env = repo_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    with work_folder("jaxreg-compile-") as folder:
        out = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", case, "--data", args.data,
                   "--factor", str(factor), "--worker-out", out]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"case": case, "error": f"timed out after {args.timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = " | ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip())[-400:]
            return {"case": case, "error": f"exit code {proc.returncode}: {tail}"}
        with open(out) as f:
            return json.load(f)


# ============================================================================= kernels


def kernel_cases(shape):
    """``(name, function, args)`` per kernel for one size; each function is a fresh closure."""
    import jax
    import jax.numpy as jnp

    from benchmarks.kernels import field_of, identity, image_of
    from jaxreg import filters
    from jaxreg.losses.similarity import lncc
    from jaxreg.sampling import sample
    from jaxreg.transforms import Displacement, Velocity, compose

    image = jnp.asarray(image_of(shape))
    other = jnp.asarray(image_of(shape, seed=5))
    coords = jnp.asarray(identity(shape) + field_of(shape))
    u1, u2 = jnp.asarray(field_of(shape, seed=3)), jnp.asarray(field_of(shape, seed=4))
    velocity = jnp.asarray(field_of(shape, seed=2))

    def warp_fwd(img, c):
        return sample(img, c, order=1, mode="constant")

    def warp_grad(img, c):
        return jax.grad(lambda c_: jnp.mean(sample(img, c_, order=1, mode="constant") ** 2))(c)

    def compose_two(a, b):
        inner = Displacement(b)
        grid = inner.grid
        return compose(Displacement(a), inner).mapped_points(grid) - grid.points()

    def svf_exp(v):
        return Velocity(v, steps=7).exp().field

    loss = lncc(radius=4)

    def lncc_grad(a, b):
        return jax.value_and_grad(loss)(a, b)

    def smooth(img):
        return filters.gaussian_smooth(img, 2.0, ndim=len(shape))

    return [
        ("warp fwd", warp_fwd, (image, coords)),
        ("warp fwd+grad", warp_grad, (image, coords)),
        ("compose 2 displacements", compose_two, (u1, u2)),
        ("svf exp (7 squarings)", svf_exp, (velocity,)),
        ("lncc r=4 fwd+grad", lncc_grad, (image, other)),
        ("gaussian_smooth sigma 2", smooth, (image,)),
    ]


def run_kernels(sizes, n: int) -> list[dict]:
    from benchmarks._timing import time_jax

    rows = []
    for shape in sizes:
        for name, fn, fn_args in kernel_cases(shape):
            row = {"kernel": name, "size": "×".join(map(str, shape)), "ndim": len(shape), "voxels": int(np.prod(shape)), "n": n}
            try:
                timing, _ = time_jax(fn, *fn_args, n=n)
            except Exception as e:  # one failing kernel must not end the run
                traceback.print_exc()
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            else:
                row.update(compile_s=timing.compile_s, median_s=timing.median_s, min_s=timing.min_s,
                           runs_to_amortise=timing.compile_s / timing.median_s)
            rows.append(row)
            print(f"  {name:26s} {row['size']:12s} compile {_f(row.get('compile_s'), '.3f')} s  "
                  f"run {_f(row.get('median_s'), '.4f')} s  {row.get('note', '')}", file=sys.stderr, flush=True)
    return rows


# ============================================================================== report


from benchmarks._timing import milliseconds as _ms, optional as _f  # noqa: E402


def render(result: dict) -> str:
    from benchmarks._timing import code_line, cpu_label, markdown_table

    m = result["machine"]
    lines = [
        f"# Compile time vs run time ({'quick' if result['settings']['quick'] else 'full'})",
        "",
        f"- machine: {cpu_label(m)} ({m['machine']}), os.cpu_count() = {m['cpu_count']}, "
        f"jax {m['jax']} on {', '.join(m['jax_devices'])}; {result['started']}",
        code_line(result),
        "- protocol: see `benchmarks/compile.py`. **compile s**: `lower(...).compile()`, tracing included; "
        "**run s**: the compiled program running (register: once; kernels: median of N calls); "
        "**runs to amortise** = compile / run. register: a fresh process per case, persistent compilation cache "
        "off, `register()` called twice (call 2 shows what the in-process caches save: JAX's, and the level programs jaxreg keeps, `jaxreg/_programs.py`). "
        "**compiled for**: a level smaller than `jaxreg._programs.FAST_COMPILE_VOXELS` voxels is compiled for a fast compile "
        "(XLA CPU's older emitters, `jaxreg._programs.FAST_COMPILE_OPTIONS`), a larger one for a fast run. "
        "**eager rest**: wall - compile - run: the pyramid, the inverse, the final warp (each a program compiled the same way) and Python.",
        "",
    ]
    if result.get("register") is not None:
        lines += ["## jaxreg.register, per pyramid level", ""]
        for rec in result["register"]:
            title = f"### {rec['case']}"
            lines += [title, ""]
            if "skipped" in rec or "error" in rec:
                lines += [f"{'skipped' if 'skipped' in rec else 'error'}: {rec.get('skipped') or rec.get('error')}", ""]
                continue
            shape = "×".join(map(str, rec["shape"]))
            lines += [f"{CASE_TEXT.get(rec['case'], rec['case'])}; grid {shape} (downsampled by {rec['factor']})"
                      if rec["factor"] > 1 else f"{CASE_TEXT.get(rec['case'], rec['case'])}; grid {shape}", ""]
            headers = ["call", "level", "compiled for", "compile s", "run s", "runs to amortise"]
            rows = []
            for call in rec["calls"]:
                for level in call.get("levels") or []:
                    ratio = level["compile_s"] / level["run_s"] if level["run_s"] else None
                    fast = level.get("fast_compile")
                    aim = "" if fast is None else ("compile" if fast else "run")
                    rows.append([call["call"], level["stage"], aim, _f(level["compile_s"], ".2f"), _f(level["run_s"], ".3f"), _f(ratio, ".1f")])
                eager = None
                if call["compile_s"] is not None and call["run_s"] is not None:
                    eager = call["wall_s"] - call["compile_s"] - call["run_s"]
                ratio = call["compile_s"] / call["run_s"] if call.get("run_s") else None
                rows.append([call["call"], f"**all** ({len(call['stages'])} levels; wall {call['wall_s']:.2f} s, "
                             f"eager rest {_f(eager, '.2f')} s)", "", _f(call["compile_s"], ".2f"), _f(call["run_s"], ".3f"), _f(ratio, ".1f")])
            lines += [markdown_table(headers, rows), ""]
    if result.get("kernels") is not None:
        lines += ["## Kernels", "", f"N = {result['settings']['kernel_n']} timed calls per program.", ""]
        headers = ["kernel", "size", "compile s", "run ms (median)", "runs to amortise", "note"]
        rows = [[r["kernel"], r["size"], _f(r.get("compile_s"), ".3f"), _ms(r.get("median_s")),
                 _f(r.get("runs_to_amortise"), ".1f"), r.get("note", "")] for r in result["kernels"]]
        lines += [markdown_table(headers, rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"register inputs downsampled by {QUICK_FACTOR}; kernels at {KERNEL_SIZES_QUICK}")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--cases", default=",".join(CASES), help=f"register cases, subset of {','.join(CASES)}")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for compile.json and compile.md")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per register case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--factor", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.data, args.factor, args.worker_out)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for name, chosen, allowed in (("only", parts, PARTS), ("cases", cases, CASES)):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"unknown --{name} {unknown}; choose from {list(allowed)}")

    from benchmarks._timing import code_version, machine_info, write_atomic

    sizes = KERNEL_SIZES_QUICK if args.quick else KERNEL_SIZES
    n = 3 if args.quick else 5
    start = time.perf_counter()
    result = {
        "suite": "compile",
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_version(REPO),
        "load_average_start": os.getloadavg(),
        "settings": {"quick": args.quick, "parts": parts, "cases": cases, "register_factor": QUICK_FACTOR if args.quick else 1,
                     "kernel_sizes": ["×".join(map(str, s)) for s in sizes], "kernel_n": n, "preset": "brain-mri"},
        "register": [] if "register" in parts else None,
        "kernels": [] if "kernels" in parts else None,
    }
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "compile.json"), os.path.join(args.out, "compile.md")

    def save():
        # Rewritten after every part, so that a run killed later still leaves its results.
        result["total_s"] = time.perf_counter() - start
        result["load_average_end"] = os.getloadavg()
        write_atomic(json_path, json.dumps(result, indent=1, default=str) + "\n")
        write_atomic(md_path, render(result))

    if "register" in parts:
        for case in cases:
            print(f"[register {case}] ...", file=sys.stderr, flush=True)
            record = run_register(case, args)
            result["register"].append(record)
            for call in record.get("calls", []):
                print(f"    call {call['call']}: wall {call['wall_s']:.2f} s  compile {_f(call['compile_s'], '.2f')} s  "
                      f"run {_f(call['run_s'], '.2f')} s", file=sys.stderr, flush=True)
            if "calls" not in record:
                print(f"    {record.get('skipped') or record.get('error')}", file=sys.stderr, flush=True)
            save()
    if "kernels" in parts:
        print("[kernels] ...", file=sys.stderr, flush=True)
        result["kernels"] = run_kernels(sizes, n)
        save()
    save()
    print(render(result))
    print(f"wrote {json_path} and {md_path} in {result['total_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
