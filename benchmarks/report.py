"""Generate the benchmark results page and its plots from ``benchmarks/results/*.json``.

    python benchmarks/report.py                                   # -> docs/benchmarks.md, docs/images/benchmarks/
    python benchmarks/report.py --results /tmp/r --page /tmp/r/benchmarks.md --images /tmp/r/images

Every number on the page comes from a results file (ratios are computed from them here);
nothing is typed by hand, so the page is regenerated, never edited. One section per suite
(``kernels``, ``pairwise``, ``population``, ``compile``, ``amortized``; a results file of
another name gets a short section naming it), each naming the machine and devices its
JSON records. Plots (matplotlib, small PNGs) go to ``--images`` and are linked relative to
the page: pairwise wall time vs accuracy (one point per method per case), population
seconds per pair vs number of pairs (vmap and loop), kernel time vs size per
implementation, kernel compile time vs run time, amortized training curves. A suite
without results says so and how to produce them.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import RETAINED_NOTE, ROTATION_NOTE, cpu_label, dispatch_text, markdown_table, write_atomic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_RESULTS = os.path.join(HERE, "results")
DEFAULT_PAGE = os.path.join(REPO, "docs", "benchmarks.md")
DEFAULT_IMAGES = os.path.join(REPO, "docs", "images", "benchmarks")
SUITES = ("kernels", "pairwise", "population", "compile", "amortized")
TITLES = {
    "kernels": "Kernels",
    "pairwise": "Pairwise registration",
    "population": "Population throughput",
    "compile": "Compile time vs run time",
    "amortized": "Amortized registration (networks)",
}
SCRIPTS = {name: f"benchmarks/{name}.py" for name in SUITES}
DPI = 80


# ----------------------------------------------------------------------------- helpers


from benchmarks._timing import milliseconds as _ms, optional as _f  # noqa: E402


def _s(seconds):
    return "" if seconds is None else f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"


def _cell(text) -> str:
    """Table-safe text: no pipes, no newlines."""
    return "" if text is None else str(text).replace("|", "/").replace("\n", " ")


def _voxels(size: str) -> int:
    return math.prod(int(n) for n in size.replace("x", "×").split("×"))


def machine_line(result: dict) -> str:
    m = result.get("machine") or {}
    cpu = cpu_label(m)
    cores = m.get("cores_available") or m.get("cpu_count")
    parts = [f"{cpu} ({m.get('machine', '?')}), {cores} cores"]
    if m.get("mem_total_gib"):
        parts.append(f"{m['mem_total_gib']} GiB RAM")
    devices = ", ".join(m.get("jax_devices") or []) or "?"
    if m.get("jax_device_kind"):
        devices += f" ({m['jax_device_kind']})"
    software = [f"jax {m.get('jax', '?')} on {devices}"]
    for name in ("torch", "scipy", "SimpleITK", "antspyx", "fireants", "icon_registration"):
        if m.get(name):
            software.append(f"{name} {m[name]}")
    if m.get("torch_cuda_device"):
        software.append(f"torch's GPU {m['torch_cuda_device']}")
    code = result.get("code") or {}
    commit = (code.get("commit") or "")[:10]
    text = f"{', '.join(parts)}; {', '.join(software)}"
    if commit:
        text += f"; jaxreg at `{commit}`" + (" (with uncommitted changes)" if code.get("uncommitted") else "")
    return text


def run_line(name: str, result: dict, path: str) -> str:
    settings = result.get("settings") or {}
    mode = "quick" if settings.get("quick") else "full"
    load = ""
    if result.get("load_average_start") and result.get("load_average_end"):
        load = f"; load average {result['load_average_start'][0]:.1f} at start, {result['load_average_end'][0]:.1f} at end"
    total = f"; {result['total_s']:.0f} s in all" if result.get("total_s") is not None else ""
    return (f"Run {result.get('started', '?')} ({mode}) on {machine_line(result)}{load}{total}. "
            f"Source: `{os.path.relpath(path, REPO)}`, written by `{SCRIPTS.get(name, SCRIPTS.get(name.split('-', 1)[0], '?'))}`.")


def _style(ax, xlabel: str, ylabel: str, *, xlog=False, ylog=False, size: int = 7):
    """Labels, log axes without crowded minor-tick labels, small fonts."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis, log, limits in ((ax.xaxis, xlog, ax.get_xlim), (ax.yaxis, ylog, ax.get_ylim)):
        if not log:
            continue
        (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
        lo, hi = limits()
        if hi / max(lo, 1e-300) < 30:  # under ~1.5 decades: label 1-2-5 steps, not only powers of ten
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel, fontsize=size)
    ax.set_ylabel(ylabel, fontsize=size)
    ax.tick_params(which="both", labelsize=size - 1)
    ax.grid(True, which="major", alpha=0.3)


class Plots:
    """Writes PNGs into ``folder`` and returns Markdown image links relative to the page."""

    def __init__(self, folder: str, page: str, prefix: str = ""):
        self.folder, self.page, self.prefix = folder, page, prefix
        self.written: list[str] = []
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self.plt = plt
        except ImportError:
            self.plt = None

    def figure(self, *args, **kwargs):
        return self.plt.subplots(*args, **kwargs)

    def save(self, fig, name: str, alt: str, *, bottom: float = 0.0) -> str:
        os.makedirs(self.folder, exist_ok=True)
        name = self.prefix + name
        path = os.path.join(self.folder, name)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        fig.savefig(path, dpi=DPI)
        self.plt.close(fig)
        self.written.append(path)
        link = os.path.relpath(path, os.path.dirname(os.path.abspath(self.page))).replace(os.sep, "/")
        return f"![{alt}]({link})"


# ----------------------------------------------------------------------------- kernels


def kernels_section(result: dict, plots: Plots) -> list[str]:
    rows = result.get("rows") or []
    lines = []
    settings = result.get("settings") or {}
    if settings.get("data"):
        lines += [f"Data: {settings['data']}.", ""]
    bandwidth = result.get("memory_bandwidth")
    if bandwidth:
        lines += [f"Memory bandwidth of the machine: {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['method']}).", ""]
    device_bandwidth = result.get("device_bandwidth")
    if device_bandwidth:
        there = "the JAX and torch rows run there" if settings.get("torch_device") == "cuda" else "the JAX rows run there"
        lines += [f"Memory bandwidth of the device: {device_bandwidth['gb_per_s']:.0f} GB/s ({device_bandwidth['method']}); "
                  f"{there}, the others on the CPU. At these sizes many GPU rows "
                  "are a few kernel launches long, so their ratios weigh dispatch as much as arithmetic.", ""]
    dispatch = dispatch_text(result.get("dispatch"))
    if dispatch:
        lines += [dispatch, ""]
    if settings.get("retain_host_memory"):
        lines += [f"Allocator: {RETAINED_NOTE}; see `jaxreg.runtime`.", ""]
    if settings.get("timing") in ("rounds", "rotated rounds"):
        rotation = f"; {ROTATION_NOTE}" if settings["timing"] == "rotated rounds" else ""
        lines += ["Every implementation of a size is warmed up once, then timed in rounds that call each of them once, in "
                  f"turn, so that a slow spell of the shared machine hits all of them alike{rotation}.", ""]
    lines += ["Median wall time of the timed calls after a warm-up call (their number is `n` in the JSON); **× jaxreg** = peer median ÷ jaxreg "
              "median (above 1: jaxreg is faster). JAX programs are compiled before timing (compile time in the "
              "*Compile time* section and in the JSON).", ""]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    for kernel in kernels:
        krows = [r for r in rows if r["kernel"] == kernel]
        impls = list(dict.fromkeys(r["impl"] for r in krows))
        peers = [i for i in impls if i != "jaxreg"]
        headers = ["size", "jaxreg ms"]
        for p in peers:
            headers += [f"{p} ms", "× jaxreg"]
        table, notes = [], {}
        for size in dict.fromkeys(r["size"] for r in krows):
            by_impl = {r["impl"]: r for r in krows if r["size"] == size}
            line = []
            for impl in ["jaxreg", *peers]:
                r = by_impl.get(impl, {})
                if r.get("note"):
                    notes.setdefault(f"{impl}: {r['note']}", None)
                cell = _ms(r.get("median_s")) or _cell(r.get("note", "").split(":")[0])
                line += [cell] if impl == "jaxreg" else [cell, _f(r.get("ratio"), ".2f")]
            table.append([size, *line])
        lines += [f"**{kernel}**", "", markdown_table(headers, table), ""]
        if notes:
            lines += [f"- {_cell(note)}" for note in notes] + [""]
    if plots.plt is not None and kernels:
        cols = min(4, len(kernels))
        nrows = math.ceil(len(kernels) / cols)
        fig, axes = plots.figure(nrows, cols, figsize=(3.0 * cols, 2.6 * nrows), squeeze=False)
        for ax, kernel in zip(axes.flat, kernels):
            krows = [r for r in rows if r["kernel"] == kernel and r.get("median_s")]
            for impl in dict.fromkeys(r["impl"] for r in krows):
                points = sorted((_voxels(r["size"]), r["median_s"] * 1e3) for r in krows if r["impl"] == impl)
                ax.plot(*zip(*points), marker="o", ms=3, label=impl)
            _style(ax, "voxels", "ms (median)", xlog=True, ylog=True)
            ax.set_title(kernel, fontsize=8)
            ax.legend(fontsize=5)
        for ax in list(axes.flat)[len(kernels):]:
            ax.axis("off")
        lines += [plots.save(fig, "kernels.png", "Kernel time vs size per implementation"), ""]
    return lines


# ---------------------------------------------------------------------------- pairwise


def _quality_key(case: dict) -> str:
    return "dice" if any("dice" in (r.get("scores") or {}) for r in case.get("rows", [])) else "ncc"


def pairwise_section(result: dict, plots: Plots) -> list[str]:
    settings = result.get("settings") or {}
    reference = settings.get("reference", "ants-syn")
    lines = []
    if settings.get("inputs"):
        lines += [f"Inputs: {settings['inputs']}.", ""]
    lines += [f"Each method runs alone in a fresh process. **wall s**: the registration call (jaxreg: tracing and "
              f"compilation included); **× {reference}** = wall ÷ {reference} wall of the same direction; "
              "**% folds**: voxels with Jacobian determinant ≤ 0. Dice is the mean over labels; NCC is computed "
              "where a case has no labels. The full protocol is in `benchmarks/results/pairwise.md`.", ""]
    cases = result.get("cases") or []
    points = {}  # case -> method -> [(wall, quality)]
    for case in cases:
        lines += [f"### {case['case']}", ""]
        if "skipped" in case:
            lines += [f"Skipped: {case['skipped']}", ""]
            continue
        if case.get("description"):
            lines += [case["description"], ""]
        key = _quality_key(case)
        label = "Dice" if key == "dice" else "NCC"
        headers = ["method", "moving→fixed", f"{label} before", f"{label} after", "% folds", "wall s", "compile s",
                   f"× {reference}", "note"]
        table = []
        for r in case.get("rows", []):
            s, before = r.get("scores") or {}, r.get("before") or {}
            table.append([r["method"], r.get("direction", ""), _f(before.get(key), ".3f"), _f(s.get(key), ".3f"),
                          _f(s.get("folds_pct"), ".3f"), _s(r.get("wall_s")), _s(r.get("compile_s")),
                          _f(r.get("wall_vs_reference"), ".2f"), _cell(r.get("note", ""))])
            if r.get("wall_s") and s.get(key) is not None:
                points.setdefault((case["case"], label), {}).setdefault(r["method"], []).append((r["wall_s"], s[key]))
        lines += [markdown_table(headers, table), ""]
    if plots.plt is not None and points:
        n = len(points)
        fig, axes = plots.figure(1, n, figsize=(2.8 * n, 2.8), squeeze=False)
        methods = list(dict.fromkeys(m for per_case in points.values() for m in per_case))
        colours = {m: f"C{i}" for i, m in enumerate(methods)}
        for ax, ((case, label), per_method) in zip(axes.flat, points.items()):
            for method, values in per_method.items():
                wall = sum(v[0] for v in values) / len(values)
                quality = sum(v[1] for v in values) / len(values)
                ax.scatter([wall], [quality], color=colours[method], label=method, s=22)
            _style(ax, "wall s (mean over directions)", f"{label} after", xlog=True)
            ax.set_title(case, fontsize=8)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in axes.flat[1:]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=len(seen), fontsize=7, frameon=False)
        lines += [plots.save(fig, "pairwise.png", "Pairwise: wall time vs accuracy, one point per method per case", bottom=0.1), ""]
    return lines


# -------------------------------------------------------------------------- population


def _sharded_batch_size(rows) -> str:
    # Results written before the per-device chunk was recorded used the whole batch_size.
    sizes = {r.get("sharded_batch_size") for r in rows if "sharded_chunked_speedup" in r}
    return "/".join(str(s) for s in sorted(sizes, key=str)) if None not in sizes else "the same"


def population_section(result: dict, plots: Plots) -> list[str]:
    settings = result.get("settings") or {}
    rows = result.get("rows") or []
    lines = []
    if settings:
        size = settings.get("size")
        lines += [f"N synthetic {size}×{size} pairs registered to one fixed image by one stage, {settings.get('steps')} "
                  "steps at the finest level; **vmap**: one `jax.jit(jax.vmap(stage))` program for the batch; "
                  "**loop**: one jitted single-pair program called N times. Compile time is excluded from the "
                  "throughput and listed apart.", ""]
    headers = ["stage", "pairs", "vmap pairs/s", "loop pairs/s", "vmap ÷ loop", "vmap compile s", "loop compile s"]
    table = [[r["stage"], r["pairs"], _f(r.get("vmap_pairs_per_s"), ".2f"), _f(r.get("loop_pairs_per_s"), ".2f"),
              _f(r.get("speedup"), ".2f"), _f(r.get("vmap_compile_s"), ".1f"), _f(r.get("loop_compile_s"), ".1f")] for r in rows]
    # Optional columns go just before the compile times.
    if any("speedup_min" in r for r in rows):
        lines += [f"**per round**: the lowest and highest of the {settings.get('rounds', '?')} vmap ÷ loop ratios of single "
                  "rounds (each program once per round): the spread the host's noise gives one measurement.", ""]
        at = headers.index("vmap compile s")
        headers[at:at] = ["per round"]
        for row, r in zip(table, rows):
            row[at:at] = [f"{r['speedup_min']:.2f}–{r['speedup_max']:.2f}" if "speedup_min" in r else ""]
    if any("chunked_pairs_per_s" in r for r in rows):
        size = settings.get("batch_size")
        lines += [f"Above {size} pairs the batch is also registered {size} at a time (`register_many(..., batch_size={size})`, "
                  "a `lax.map` over vmapped chunks), whose working set stays in cache.", ""]
        at = headers.index("vmap compile s")
        headers[at:at] = [f"{size} at a time pairs/s", f"{size} at a time ÷ loop"]
        for row, r in zip(table, rows):
            row[at:at] = [_f(r.get("chunked_pairs_per_s"), ".2f"), _f(r.get("chunked_speedup"), ".2f")]
    if any("library_pairs_per_s" in r for r in rows):
        lines += ["**register_many**: the library's default call on one device, `register_many(stage, fixed, moving, **options)`: "
                  f"on a CPU it registers chunks of about {_f(settings.get('cpu_chunk_voxels'), ',')} voxels of pairs (`jaxreg.population.CPU_CHUNK_VOXELS`), "
                  "each one vmapped call, from one host thread per core at the same time; on an accelerator it is one "
                  "vmap, as the vmap column. **calls on threads**: how many calls it made, on how many threads. "
                  "**its per round** as **per round**, for register_many ÷ loop.", ""]
        at = headers.index("vmap compile s")
        headers[at:at] = ["register_many pairs/s", "register_many ÷ loop", "its per round", "calls on threads"]
        for row, r in zip(table, rows):
            row[at:at] = [_f(r.get("library_pairs_per_s"), ".2f"), _f(r.get("library_speedup"), ".2f"),
                          f"{r['library_speedup_min']:.2f}–{r['library_speedup_max']:.2f}" if "library_speedup_min" in r else "",
                          f"{r['library_calls']} on {r['library_threads']}" if "library_calls" in r else ""]
    if any("sharded_pairs_per_s" in r for r in rows):
        devices = settings.get("devices", "?")
        chunked = any("sharded_chunked_speedup" in r for r in rows)
        lines += [f"**sharded**: `register_many(stage, ..., devices={devices})`, the pairs split over {devices} devices; on CPU "
                  f"each core is made a device with `XLA_FLAGS=--xla_force_host_platform_device_count={devices}` (set "
                  "before JAX starts; the vmap and loop programs run on one device as without it), so that each core "
                  "registers its own share of the pairs. **sharded per round** as **per round**, for sharded ÷ loop."
                  + (f" Above {settings.get('batch_size')} pairs also {settings.get('batch_size')} pairs in flight: "
                     f"`batch_size={_sharded_batch_size(rows)}`, each device mapping over its own share that many at a time."
                     if chunked else ""), ""]
        at = headers.index("vmap compile s")
        added = ["sharded pairs/s", "sharded ÷ loop", "sharded per round"]
        if chunked:
            added.append(f"sharded, {settings.get('batch_size')} in flight ÷ loop")
        headers[at:at] = added
        for row, r in zip(table, rows):
            cells = [_f(r.get("sharded_pairs_per_s"), ".2f"), _f(r.get("sharded_speedup"), ".2f"),
                     f"{r['sharded_speedup_min']:.2f}–{r['sharded_speedup_max']:.2f}" if "sharded_speedup_min" in r else ""]
            if chunked:
                cells.append(_f(r.get("sharded_chunked_speedup"), ".2f"))
            row[at:at] = cells
    lines += [markdown_table(headers, table), ""]
    if plots.plt is not None and rows:
        fig, ax = plots.figure(figsize=(4.2, 3.0))
        for i, stage in enumerate(dict.fromkeys(r["stage"] for r in rows)):
            srows = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["pairs"])
            pairs = [r["pairs"] for r in srows]
            ax.plot(pairs, [1.0 / r["vmap_pairs_per_s"] for r in srows], marker="o", color=f"C{i}", label=f"{stage} vmap")
            ax.plot(pairs, [1.0 / r["loop_pairs_per_s"] for r in srows], marker="s", ls="--", color=f"C{i}", label=f"{stage} loop")
            library = [r for r in srows if "library_pairs_per_s" in r]
            if library:
                ax.plot([r["pairs"] for r in library], [1.0 / r["library_pairs_per_s"] for r in library], marker="D", ls="-.",
                        color=f"C{i}", label=f"{stage} register_many")
            sharded = [r for r in srows if "sharded_pairs_per_s" in r]
            if sharded:
                ax.plot([r["pairs"] for r in sharded], [1.0 / r["sharded_pairs_per_s"] for r in sharded], marker="^", ls=":",
                        color=f"C{i}", label=f"{stage} sharded")
        _style(ax, "pairs", "seconds per pair", ylog=True)
        ax.set_xscale("log", base=2)
        counts = sorted({r["pairs"] for r in rows})
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.legend(fontsize=6)
        lines += [plots.save(fig, "population.png", "Population: seconds per pair vs number of pairs, vmap, loop, register_many and sharded"), ""]
    return lines


# ----------------------------------------------------------------------------- compile


def compile_section(result: dict, plots: Plots) -> list[str]:
    calls = max((len(rec.get("calls", [])) for rec in result.get("register") or []), default=0)
    lines = ["**compile s**: `lower(...).compile()`, tracing included; **run s**: the compiled program running; "
             "**runs to amortise** = compile ÷ run."]
    if calls:
        lines[0] += (f" `register()` is called {calls} times in one fresh process per case (persistent compilation "
                     "cache off); the later calls show what the in-process caches save (JAX's, and the level programs jaxreg keeps).")
    lines.append("")
    for rec in result.get("register") or []:
        lines += [f"### register: {rec['case']}", ""]
        if "calls" not in rec:
            lines += [f"{'Skipped' if 'skipped' in rec else 'Error'}: {rec.get('skipped') or rec.get('error')}", ""]
            continue
        shape = "×".join(map(str, rec["shape"]))
        lines += [f"Grid {shape}" + (f" (inputs downsampled by {rec['factor']})" if rec.get("factor", 1) > 1 else "")
                  + f", preset `{rec.get('preset', '?')}`.", ""]
        headers = ["call", "level", "compile s", "run s", "runs to amortise"]
        table = []
        for call in rec["calls"]:
            for level in call.get("levels") or []:
                ratio = level["compile_s"] / level["run_s"] if level.get("run_s") else None
                table.append([call["call"], level["stage"], _f(level["compile_s"], ".2f"), _f(level["run_s"], ".3f"), _f(ratio, ".1f")])
            ratio = call["compile_s"] / call["run_s"] if call.get("run_s") and call.get("compile_s") is not None else None
            table.append([call["call"], f"all levels (wall {_s(call['wall_s'])} s)", _f(call.get("compile_s"), ".2f"),
                          _f(call.get("run_s"), ".3f"), _f(ratio, ".1f")])
        lines += [markdown_table(headers, table), ""]
    kernels = result.get("kernels") or []
    if kernels:
        n = (result.get("settings") or {}).get("kernel_n")
        lines += ["### Kernel programs", "", f"Run time: median of {n} calls.", ""]
        table = [[r["kernel"], r["size"], _f(r.get("compile_s"), ".3f"), _ms(r.get("median_s")),
                  _f(r.get("runs_to_amortise"), ".1f"), _cell(r.get("note", ""))] for r in kernels]
        lines += [markdown_table(["kernel", "size", "compile s", "run ms", "runs to amortise", "note"], table), ""]
        if plots.plt is not None and any(r.get("median_s") for r in kernels):
            fig, ax = plots.figure(figsize=(4.6, 3.2))
            for i, kernel in enumerate(dict.fromkeys(r["kernel"] for r in kernels)):
                krows = sorted((r for r in kernels if r["kernel"] == kernel and r.get("median_s")), key=lambda r: r["voxels"])
                ax.plot([r["median_s"] * 1e3 for r in krows], [r["compile_s"] for r in krows], marker="o", ms=3,
                        color=f"C{i}", label=kernel)
            _style(ax, "run ms (points: sizes, small to large)", "compile s", xlog=True, ylog=True)
            ax.legend(fontsize=5)
            lines += [plots.save(fig, "compile.png", "Kernel programs: compile time vs run time"), ""]
    return lines


# --------------------------------------------------------------------------- amortized


def amortized_section(result: dict, plots: Plots) -> list[str]:
    from benchmarks.amortized import (NETWORK_3D, block_steps, busy_note, comparison_label, experiments_run, how_compared,
                                      network_tables, per_turn, tool_name)

    settings = result.get("settings") or {}
    mnist, network_3d = experiments_run(result)
    lines = []
    if mnist:
        lines += [f"MNIST multistep network: {settings.get('steps')} training steps per run, seed {settings.get('seed')}; "
                  "each run in its own process (the experiment is specified in `benchmarks/peers/icon_mnist.py`). "
                  "**steps/s**: training steps per second after the warm-up steps; **speed-up** = jaxreg steps/s ÷ "
                  "icon_registration steps/s.", ""]
    if network_3d:
        lines += [f"3-D network: `examples/gradicon_3d.py --steps {settings.get('steps_3d')}` in its own process "
                  "(a two-step U-Net trained with GradICON on synthetic shapes; evaluated on new synthetic pairs and on "
                  "the OASIS pair, which it never saw), and icon_registration's copy of it (`benchmarks/peers/icon_3d.py`: the "
                  "same training pairs, U-Net, GradICON loss and scoring), "
                  + (f"side by side, taking turns every {block_steps(result, NETWORK_3D)} steps." if settings.get("turns_3d")
                     else "one after the other."), ""]
    busy = busy_note(result) if result.get("rows") else ""
    if busy:
        lines += [f"!!! warning\n    {busy}", ""]
    comparisons = result.get("comparisons") or []
    if comparisons:
        lines += [how_compared(result), ""]
        table = [[comparison_label(c), _f(c.get("steps_per_second_ratio"), ".2f"),
                  ", ".join(_f(v, ".2f") for v in c.get("steps_per_second_ratio_per_round") or []), per_turn(c),
                  c.get("jaxreg_devices", 1), c.get("icon_threads"), _f(c.get("target"), "g"),
                  {True: "yes", False: "no"}.get(c.get("meets_target"), ""), _f(c.get("inference_pairs_per_second_ratio"), ".2f")]
                 for c in comparisons]
        lines += [markdown_table(["loss", "speed-up (training)", "per round", "per turn", "jaxreg devices (fastest)", "icon torch threads (fastest)",
                                  "target", "met", "speed-up (inference)"], table), ""]
    rows = result.get("rows") or []
    for network in dict.fromkeys(r["network"] for r in rows):
        lines += [f"### {network}", "", *network_tables(result, network, cell=_cell)]
    curves = [(f"{tool_name(r)}, {r['loss']}", r["loss_curve"]) for r in rows
              if r.get("status") == "ok" and r.get("network") == "mnist-multistep" and r.get("loss_curve")]
    if plots.plt is not None and curves:
        fig, ax = plots.figure(figsize=(4.4, 3.0))
        for label, points in curves:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
        _style(ax, "training step", "training loss (mean over the logging interval)")
        ax.legend(fontsize=6)
        lines += [plots.save(fig, "amortized.png", "Amortized: training loss vs step"), ""]
    return lines


RENDERERS = {"kernels": kernels_section, "pairwise": pairwise_section, "population": population_section,
             "compile": compile_section, "amortized": amortized_section}


# -------------------------------------------------------------------------------- page


def build_page(results_dir: str, page: str, images: str) -> tuple[str, list[str]]:
    plots = Plots(images, page)
    found = {os.path.splitext(os.path.basename(p))[0]: p for p in sorted(glob.glob(os.path.join(results_dir, "*.json")))}
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.json: do not edit by hand. -->",
        "",
        "Every number below is read from the JSON files that the benchmark scripts write; rerun them with "
        "`python benchmarks/run.py` (all suites, then this page) or one suite with "
        "`python benchmarks/run.py --suite NAME`. Peers (torch, ANTsPy, FireANTs, icon_registration) come from "
        "the `bench` extra: `pip install \".[bench]\"`; a peer that is missing is a row that says so.",
        "",
    ]
    summary = []
    for name in [*SUITES, *sorted(set(found) - set(SUITES))]:
        if name not in found:
            summary.append([TITLES.get(name, name), "not run", "", ""])
            continue
        with open(found[name]) as f:
            result = json.load(f)
        settings = result.get("settings") or {}
        devices = ", ".join((result.get("machine") or {}).get("jax_devices") or [])
        summary.append([TITLES.get(name, name), "quick" if settings.get("quick") else "full", result.get("started", ""), devices])
    lines += [markdown_table(["suite", "mode", "run at", "JAX devices"], summary), ""]
    for name in SUITES:
        lines += [f"## {TITLES[name]}", ""]
        if name not in found:
            lines += [f"No results yet: `python benchmarks/run.py --suite {name}`.", ""]
            continue
        with open(found[name]) as f:
            result = json.load(f)
        lines += [run_line(name, result, found[name]), ""]
        try:
            lines += RENDERERS[name](result, plots)
        except Exception as e:  # a results file of an older layout must not stop the page
            lines += [f"(This results file could not be rendered: {type(e).__name__}: {_cell(e)}.)", ""]
    for name in sorted(set(found) - set(SUITES)):
        with open(found[name]) as f:
            result = json.load(f)
        # "<suite>-<what>.json": a later partial run of a suite (e.g. pairwise-oasis3d, one case
        # rerun after a change) is drawn by that suite's renderer under its own heading.
        suite = name.split("-", 1)[0]
        lines += [f"## {TITLES.get(suite, suite)}: {name.split('-', 1)[1]}" if suite in RENDERERS and "-" in name else f"## {name}", "",
                  run_line(name, result, found[name]), ""]
        if suite in RENDERERS and "-" in name:
            named = Plots(images, page, prefix=name + "_")
            try:
                lines += RENDERERS[suite](result, named)
                plots.written += named.written
            except Exception as e:
                lines += [f"(This results file could not be rendered: {type(e).__name__}: {_cell(e)}.)", ""]
        else:
            lines += ["No renderer for this results file yet; see its Markdown next to it.", ""]
    return "\n".join(lines).rstrip() + "\n", plots.written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="folder of the suites' *.json")
    parser.add_argument("--page", default=DEFAULT_PAGE, help="the Markdown page to write")
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="folder for the plots")
    args = parser.parse_args(argv)
    text, images = build_page(os.path.abspath(args.results), os.path.abspath(args.page), os.path.abspath(args.images))
    write_atomic(args.page, text)
    # The folder is this script's: plots of suites that have no results any more go.
    for stale in set(glob.glob(os.path.join(os.path.abspath(args.images), "*.png"))) - {os.path.abspath(p) for p in images}:
        os.remove(stale)
    print(f"wrote {args.page} and {len(images)} plots in {args.images}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
