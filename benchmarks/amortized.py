"""Amortized registration: jaxreg's networks next to icon_registration on the same experiment.

    python benchmarks/amortized.py                       # 2000 training steps per run (long)
    python benchmarks/amortized.py --quick               # 200 steps
    python benchmarks/amortized.py --steps 100 --losses diffusion,gradicon --out /tmp/amortized

Writes ``amortized.json`` and ``amortized.md`` into ``--out`` (default
``benchmarks/results``) and prints the Markdown. Every run is its own Python process, so
that speed and peak memory are its own and a crash costs one row. The runs of one loss
(every configuration of both sides) run **side by side, taking turns** on the machine
(:mod:`benchmarks._turns`): only the process holding the turn computes, and the turn goes
round every 50 training steps, so a machine whose speed drifts slows both sides alike
(``--one-at-a-time`` runs them one after the other instead). Steps/s count only the
steps, not the waits for a turn, and the ratio is also reported turn by turn.

- ``jaxreg``: ``python examples/mnist_multistep.py --steps N --out DIR --data PATH --loss L
  --seed S --lmbda λ --devices K`` (JAX's persistent compilation cache off), once per
  ``--jaxreg-devices`` value (default 1 and 2 on a CPU with 2 or more cores, else 1; on
  CPU, K XLA CPU devices share each batch, the
  data-parallel path of :func:`jaxreg.nn.train`); it writes ``DIR/metrics.json``. The
  speed-up is taken from jaxreg's fastest row, as icon's is from its fastest.
- ``icon_registration``: ``python benchmarks/peers/icon_mnist.py`` with the same steps,
  data, loss, seed and λ (``--lmbda``, jaxreg's convention, converted to icon's inside
  the peer; see its docstring). It runs with ``--peer-python`` (default: this
  interpreter), so a virtual environment holding the ``bench`` extra can serve it, once
  per ``--icon-threads`` value (torch threads; default the cores available). The
  speed-up is taken against icon's fastest row: on a busy machine torch's OpenMP threads
  slow down far more than XLA's (200 steps here at a 1-minute load average of 3 to 5 on
  2 cores: 0.8 to 2.9 steps/s with 2 threads, 4.8 with 1), so ``--icon-threads 1,2``
  keeps the comparison fair there. Each row records the 1-minute load average before and
  after it, and the Markdown warns when the machine was busy.
- the 3-D network: ``python examples/gradicon_3d.py --steps N3 --out DIR``, then its
  icon_registration copy ``python benchmarks/peers/icon_3d.py`` with the same arguments
  (same training pairs, same U-Net, GradICON with λ converted, scored by the example's
  own functions), side by side taking turns every ``BLOCK`` training steps (the example's
  chunk of steps; each run records it as ``block_steps``); the speed-up compares their
  steps/s, also turn by turn.

A run that cannot happen (example missing, icon_registration not importable) is a row
with the reason. The experiment: an MLP on the two 28×28 images, applied 8 times with
shared weights (multistep, each step composing its displacement on the right), trained on
pairs of fives (batches of 128, Adam 1e-3), evaluated on 256 pairs of fives and 256 of
sevens from the test set. **speed-up** = jaxreg training steps/s ÷ icon's (target ≥ 3×).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._paths import HERE, REPO, RESULTS as DEFAULT_OUT, SHARED_DATA, repo_env, work_folder  # noqa: E402

DEFAULT_DATA = os.path.join(SHARED_DATA, "mnist", "mnist.npz")
JAXREG_EXAMPLE = os.path.join(REPO, "examples", "mnist_multistep.py")
JAXREG_3D_EXAMPLE = os.path.join(REPO, "examples", "gradicon_3d.py")
ICON_PEER = os.path.join(HERE, "peers", "icon_mnist.py")
ICON_3D_PEER = os.path.join(HERE, "peers", "icon_3d.py")
NETWORK_3D = "3-D network (examples/gradicon_3d.py)"
LOSSES = ("diffusion", "icon", "gradicon")
TARGET_SPEEDUP = 3.0
ACCURACY = ("ssd_before", "ssd_after", "dice_before", "dice_after", "folded_fraction", "objective")


# ----------------------------------------------------------------------- metrics


def _find(metrics: dict, *candidates, contains: tuple = ()):
    """The first of ``candidates`` present in ``metrics`` (or one level down); else the first
    key containing every string of ``contains``. None when nothing matches."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    levels = [metrics] + [v for v in metrics.values() if isinstance(v, dict)]
    for level in levels:
        for key in candidates:
            if number(level.get(key)):
                return float(level[key])
    if contains:
        for level in levels:
            for key, value in level.items():
                if all(c in key.lower() for c in contains) and number(value):
                    return float(value)
    return None


def summarize(metrics: dict) -> dict:
    """The numbers this suite compares, from either side's metrics.json (key names may differ)."""
    out = {
        "steps_per_second": _find(metrics, "steps_per_second", "train_steps_per_second"),
        "train_seconds": _find(metrics, "train_seconds", "training_seconds"),
        "compile_seconds": _find(metrics, "compile_seconds", "compile_s"),
        "final_loss": _find(metrics, "final_loss", "final_training_loss"),
        "peak_rss_mib": _find(metrics, "peak_rss_mib", "peak_rss_MiB", "max_rss_mib", contains=("rss",)),
        "inference_pairs_per_second": _find(metrics, "inference_pairs_per_second", "inference_pairs_per_s",
                                            contains=("inference", "per_s")),
        "lmbda": _find(metrics, "lmbda", "lambda", "lam"),
    }
    if isinstance(metrics.get("block_steps"), int):
        out["block_steps"] = metrics["block_steps"]
    blocks = metrics.get("block_steps_per_second")
    if isinstance(blocks, list) and all(isinstance(v, (int, float)) for v in blocks):
        out["block_steps_per_second"] = blocks
    out["eval"] = {}
    for name, values in eval_sets(metrics).items():
        values = dict(values)
        values.setdefault("objective", values.get("objective_after"))  # both names are in use
        values.setdefault("folded_fraction", None if values.get("folded_percent_on_network_grid") is None
                          else values["folded_percent_on_network_grid"] / 100.0)
        out["eval"][name] = {k: values[k] for k in ACCURACY if isinstance(values.get(k), (int, float))}
    return out


def eval_sets(metrics: dict) -> dict:
    """Evaluation results in a metrics.json: top-level dicts with before/after scores (MNIST
    ``fives``, ``sevens``; 3-D ``synthetic``), and such dicts one level down (``oasis``'s
    directions), named ``"oasis 0001<-0002"``."""
    def scored(d):
        return isinstance(d, dict) and any(k in d for k in ("dice_after", "ssd_after"))

    found = {}
    for name, value in metrics.items():
        if scored(value):
            found[name] = value
        elif isinstance(value, dict):
            for inner, v in value.items():
                if scored(v):
                    found[f"{name} {inner}"] = v
    return found


def loss_curve(metrics: dict, log_path: str) -> list:
    """``[[step, training loss], ...]``: the icon peer's ``loss_history_every_10`` (means of
    10 steps), or the ``step``/``loss`` entries of a jaxreg ``log.jsonl`` (means over its
    logging interval)."""
    history = metrics.get("loss_history_every_10")
    if isinstance(history, list):
        return [[10 * (i + 1), v] for i, v in enumerate(history)]
    curve = []
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry.get("step"), (int, float)) and isinstance(entry.get("loss"), (int, float)):
                    curve.append([entry["step"], entry["loss"]])
    return curve


def _slim(metrics: dict, limit: int = 400) -> dict:
    """The metrics without long lists (loss histories), for the results file."""
    return {k: (v if not isinstance(v, list) or len(v) <= limit else f"<list of {len(v)}>") for k, v in metrics.items()}


# ------------------------------------------------------------------------ running


def run_group(jobs, timeout: float, *, in_turn: bool = True) -> list[dict]:
    """Run ``jobs`` (``(command, folder, env)`` each; the command writes ``folder/metrics.json``)
    and return one record per job. ``in_turn``: side by side, taking turns on the machine
    (:mod:`benchmarks._turns`: only one computes at a time, and the turn goes round every
    block of timed work, so that a drifting machine slows every job alike); otherwise one
    after the other. ``timeout`` is per job."""
    if not in_turn:
        return [record for job in jobs for record in run_group([job], timeout)]
    from benchmarks._turns import run_in_turn

    for _, folder, _ in jobs:
        os.makedirs(folder, exist_ok=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    outcomes = run_in_turn([(command, os.path.join(folder, "log.txt"), env) for command, folder, env in jobs],
                           timeout=timeout * len(jobs), cwd=REPO)
    process_s, load = time.perf_counter() - start, [load_before, os.getloadavg()[0]]
    records = []
    for (command, folder, _), outcome in zip(jobs, outcomes):
        record = {"command": [os.path.relpath(c, REPO) if os.path.isabs(c) and c.startswith(REPO) else c for c in command],
                  "process_s": process_s, "load_average_1min": load, "turns": outcome["turns"],
                  "side_by_side": len(jobs)}
        records.append(_outcome(record, folder, outcome, timeout * len(jobs)))
    return records


def _outcome(record: dict, folder: str, outcome: dict, timeout: float) -> dict:
    metrics_path = os.path.join(folder, "metrics.json")
    if outcome["returncode"] == 0 and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        if "skipped" in metrics:
            record.update(status="skipped", note=str(metrics["skipped"]))
        else:
            record.update(status="ok", summary=summarize(metrics), metrics=_slim(metrics))
            curve = loss_curve(metrics, os.path.join(folder, "log.jsonl"))
            if curve:
                record["loss_curve"] = curve
        return record
    with open(os.path.join(folder, "log.txt"), errors="replace") as f:
        tail = [line.strip() for line in f.read().splitlines() if line.strip() and "WARNING" not in line][-3:]
    why = f"timed out after {timeout:.0f} s" if outcome["timed_out"] else f"exit code {outcome['returncode']}"
    record.update(status="error", note=f"{why}: {' | '.join(tail)[-400:]}")
    return record


def environment(jax_side: bool) -> dict:
    env = repo_env()
    if jax_side:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # compile time is part of what is measured
    return env


def mnist_rows(loss: str, args, workdir: str) -> list[dict]:
    """Every configuration of one loss (jaxreg's device counts, icon's thread counts),
    ``args.repeats`` times; each time all of them side by side taking turns (or one after
    the other with ``--one-at-a-time``). Each run is a row with its ``repeat`` number."""
    base = {"network": "mnist-multistep", "loss": loss, "steps": args.steps, "seed": args.seed}
    common = ["--steps", str(args.steps), "--data", args.data, "--loss", loss, "--seed", str(args.seed),
              "--lmbda", repr(args.lmbda)]
    rows = []
    for repeat in range(1, args.repeats + 1):
        tag = dict(repeat=repeat) if args.repeats > 1 else {}
        suffix = f"-run{repeat}" if args.repeats > 1 else ""
        planned, jobs = [], []
        for devices in args.jaxreg_devices:
            row = dict(base, tool="jaxreg", devices=devices, **tag)
            folder = os.path.join(workdir, f"jaxreg-{loss}-{devices}{suffix}")
            if not os.path.exists(JAXREG_EXAMPLE):
                row.update(status="skipped", note="examples/mnist_multistep.py not found (the jaxreg side of this experiment is not written yet)")
            else:
                jobs.append(([sys.executable, JAXREG_EXAMPLE, "--out", folder, *common, "--devices", str(devices)],
                             folder, environment(True)))
            planned.append(row)
        for threads in args.icon_threads:
            folder = os.path.join(workdir, f"icon-{loss}-{threads}{suffix}")
            jobs.append(([args.peer_python, ICON_PEER, "--out", folder, *common, "--threads", str(threads)],
                         folder, environment(False)))
            planned.append(dict(base, tool="icon_registration", threads=threads, **tag))
        names = ", ".join(tool_name(r) for r in planned if "status" not in r)
        how = "one after the other" if args.one_at_a_time else "side by side, in turn"
        print(f"[{loss}] {names}: {how} ...", file=sys.stderr, flush=True)
        records = iter(run_group(jobs, args.timeout, in_turn=not args.one_at_a_time))
        rows += [row if "status" in row else dict(row, **next(records)) for row in planned]
    return rows


def network3d_rows(args, workdir: str) -> list[dict]:
    """The 3-D GradICON network: jaxreg's example once per ``--jaxreg-devices`` value and
    icon_registration's copy of it (``benchmarks/peers/icon_3d.py``, same data, network,
    loss and evaluation) once per ``--icon-threads`` value, side by side taking turns every ``gradicon_3d.BLOCK`` training steps (or one after
    the other with ``--one-at-a-time``)."""
    base = {"network": NETWORK_3D, "loss": "gradicon", "steps": args.steps_3d}
    common = ["--steps", str(args.steps_3d), *args.args_3d.split()]
    planned, jobs = [], []
    for devices in args.jaxreg_devices:
        row = dict(base, tool="jaxreg", devices=devices)
        if not os.path.exists(JAXREG_3D_EXAMPLE):
            row.update(status="skipped", note="examples/gradicon_3d.py not found")
        else:
            folder = os.path.join(workdir, f"jaxreg-3d-{devices}")
            jobs.append(([sys.executable, JAXREG_3D_EXAMPLE, "--out", folder, *common, "--devices", str(devices)],
                         folder, environment(True)))
        planned.append(row)
    for threads in args.icon_threads:
        folder = os.path.join(workdir, f"icon-3d-{threads}")
        jobs.append(([args.peer_python, ICON_3D_PEER, "--out", folder, *common, "--threads", str(threads)], folder, environment(False)))
        planned.append(dict(base, tool="icon_registration", threads=threads))
    how = "one after the other" if args.one_at_a_time else "side by side, in turn"
    print("[3-D] " + ", ".join(tool_name(r) for r in planned if "status" not in r) + f": {how} ...", file=sys.stderr, flush=True)
    records = iter(run_group(jobs, args.timeout, in_turn=not args.one_at_a_time))
    return [row if "status" in row else dict(row, **next(records)) for row in planned]


def _config(row: dict):
    return (row["tool"], row.get("devices"), row.get("threads"))


def turn_ratios(ours: list[dict], theirs: list[dict]) -> list[float]:
    """The ratio of both sides' speeds within each turn they took side by side: the k-th
    block of steps of one run against the k-th of the other run of the same round (the
    first block, holding start-up and compilation, left out)."""
    ratios = []
    for a in ours:
        for b in theirs:
            if a.get("repeat") != b.get("repeat") or not (a.get("side_by_side", 1) > 1 and b.get("side_by_side", 1) > 1):
                continue
            ours_blocks = a["summary"].get("block_steps_per_second") or []
            theirs_blocks = b["summary"].get("block_steps_per_second") or []
            ratios += [x / y for x, y in zip(ours_blocks[1:], theirs_blocks[1:]) if y > 0]
    return ratios


def compare(rows: list[dict]) -> list[dict]:
    """Per loss, jaxreg's fastest configuration against icon_registration's (over device and
    thread counts), each by its median steps/s over the repeats. With repeats, also the
    ratio within each round (both sides' fastest rows of that round), which a drifting
    machine disturbs least."""
    out = []
    for network, loss in [("mnist-multistep", loss) for loss in LOSSES] + [(NETWORK_3D, "gradicon")]:
        ok = [r for r in rows if r["network"] == network and r["loss"] == loss and r.get("status") == "ok"
              and (r.get("summary") or {}).get("steps_per_second")]
        by_config = {}
        for r in ok:
            by_config.setdefault(_config(r), []).append(r)
        medians = {config: {key: statistics.median([r["summary"][key] for r in runs if r["summary"].get(key)] or [0.0])
                            for key in ("steps_per_second", "inference_pairs_per_second")}
                   for config, runs in by_config.items()}
        ours = [c for c in medians if c[0] == "jaxreg"]
        theirs = [c for c in medians if c[0] == "icon_registration"]
        if not ours or not theirs:
            continue
        best_ours = max(ours, key=lambda c: medians[c]["steps_per_second"])
        best_theirs = max(theirs, key=lambda c: medians[c]["steps_per_second"])
        j, i = medians[best_ours], medians[best_theirs]
        record = {"loss": loss, "network": network, "target": TARGET_SPEEDUP, "icon_threads": best_theirs[2], "jaxreg_devices": best_ours[1] or 1,
                  "runs_per_config": max(len(v) for v in by_config.values()),
                  "jaxreg_steps_per_second": j["steps_per_second"], "icon_steps_per_second": i["steps_per_second"]}
        for key in ("steps_per_second", "inference_pairs_per_second"):
            if j.get(key) and i.get(key):
                record[f"{key}_ratio"] = j[key] / i[key]
        rounds = sorted({r.get("repeat") for r in ok if r.get("repeat")})
        per_round = []
        for repeat in rounds:
            in_round = [r for r in ok if r.get("repeat") == repeat]
            a = [r["summary"]["steps_per_second"] for r in in_round if r["tool"] == "jaxreg"]
            b = [r["summary"]["steps_per_second"] for r in in_round if r["tool"] == "icon_registration"]
            if a and b:
                per_round.append(max(a) / max(b))
        if per_round:
            record["steps_per_second_ratio_per_round"] = per_round
        per_turn = turn_ratios([r for r in ok if _config(r) == best_ours], [r for r in ok if _config(r) == best_theirs])
        if per_turn:
            record["steps_per_second_ratio_per_turn"] = {"median": statistics.median(per_turn), "min": min(per_turn),
                                                         "max": max(per_turn), "turns": len(per_turn)}
        if "steps_per_second_ratio" in record:
            record["meets_target"] = record["steps_per_second_ratio"] >= TARGET_SPEEDUP
        out.append(record)
    return out


# ------------------------------------------------------------------------- report


def _f(value, spec):
    return "" if value is None else format(value, spec)


def tool_name(row: dict) -> str:
    run = f", run {row['repeat']}" if row.get("repeat") else ""
    if row.get("threads"):
        return f"{row['tool']} ({row['threads']} thread{'s' if row['threads'] != 1 else ''}{run})"
    if row.get("devices"):
        return f"{row['tool']} ({row['devices']} device{'s' if row['devices'] != 1 else ''}{run})"
    return row["tool"]


def busy_note(result: dict) -> str:
    """A warning when the machine was busy during a run (1-min load average above half the cores)."""
    cores = result["settings"].get("threads") or 1
    loads = [x for r in result["rows"] for x in (r.get("load_average_1min") or [])]
    if loads and max(loads) > 0.5 * cores:
        return (f"The machine was busy (1-min load average up to {max(loads):.1f} on {cores} cores): timings are not "
                "reliable, torch's OpenMP threads in particular slow down sharply when other processes hold the cores "
                "(`--icon-threads 1,2` adds a single-threaded icon row, and the speed-up takes icon's fastest).")
    return ""


def network_tables(result: dict, network: str, cell=str) -> list[str]:
    """Markdown lines of one network's speed table and accuracy table (this file's Markdown
    and the docs' results page both draw them); ``cell`` escapes free text such as notes."""
    from benchmarks._timing import markdown_table

    rows = [r for r in result.get("rows") or [] if r["network"] == network]
    speed = []
    for r in rows:
        summary = r.get("summary") or {}
        note = r.get("note", "") if r.get("status") != "ok" else r.get("lmbda_note", "")
        load = r.get("load_average_1min")
        speed.append([r["loss"], tool_name(r), r.get("status", ""), _f(summary.get("lmbda"), "g"), _f(summary.get("steps_per_second"), ".2f"),
                      _f(summary.get("train_seconds"), ".1f"), _f(summary.get("compile_seconds"), ".1f"), _f(summary.get("final_loss"), ".5f"),
                      _f(summary.get("peak_rss_mib"), ".0f"), _f(summary.get("inference_pairs_per_second"), ".0f"),
                      "" if not load else f"{load[0]:.1f} → {load[1]:.1f}", cell(note)])
    lines = [markdown_table(["loss", "tool", "status", "λ", "steps/s", "train s", "compile s", "final loss", "peak MiB",
                             "inference pairs/s", "load avg (1 min)", "note"], speed), ""]
    accuracy = []
    # Repeats rerun the same seeded training, so their accuracy is the first run's (the
    # speed table lists every run's final loss).
    for r in (r for r in rows if r.get("status") == "ok" and r.get("repeat", 1) == 1):
        summary = r.get("summary") or {}
        sets = summary.get("eval") or {n: summary[n] for n in ("fives", "sevens") if summary.get(n)}  # older files
        for name, values in sets.items():
            accuracy.append([r["loss"], tool_name(r), name, *[_f(values.get(k), ".4f") for k in ACCURACY]])
    if accuracy:
        lines += [markdown_table(["loss", "tool", "pairs", "SSD before", "SSD after", "Dice before", "Dice after",
                                  "folded", "objective"], accuracy), ""]
    return lines


# Training steps per turn of the runs that recorded none (written before "block_steps").
_BLOCK_STEPS_BEFORE_RECORDED = {"mnist-multistep": 50, NETWORK_3D: 25}


def block_steps(result: dict, network: str) -> int:
    """Training steps per turn of ``network``'s runs, as its processes recorded them."""
    recorded = {(r.get("summary") or {}).get("block_steps") for r in result.get("rows") or [] if r.get("network") == network}
    recorded.discard(None)
    if len(recorded) > 1:
        raise ValueError(f"{network}: runs took turns of different lengths {sorted(recorded)}")
    return recorded.pop() if recorded else _BLOCK_STEPS_BEFORE_RECORDED[network]


def how_compared(result: dict) -> str:
    """How the speed-up was measured (this file's Markdown and the docs' results page)."""
    comparisons = result.get("comparisons") or [{}]
    runs = max(c.get("runs_per_config", 1) for c in comparisons)
    has_mnist = any(_network(c) == "mnist-multistep" for c in comparisons)
    has_3d = any(_network(c) != "mnist-multistep" for c in comparisons)
    settings = result.get("settings") or {}
    # Files written before the 3-D runs took turns have no "turns_3d": theirs ran one after the other.
    mnist_turns = has_mnist and settings.get("side_by_side")
    turns_3d = has_3d and settings.get("turns_3d")
    blocks = " and ".join(f"{what} every {n} training steps" for what, n, present in
                          (("MNIST", block_steps(result, "mnist-multistep"), mnist_turns),
                           ("the 3-D network", block_steps(result, NETWORK_3D), turns_3d)) if present)
    turns = (f"The configurations of a network and loss ran side by side, taking turns on the machine ({blocks}; only "
             "the one holding the turn computes; start-up, compilation and evaluation run in turns of their own), so "
             "that a machine whose speed drifts slows both sides alike. **per turn**: the ratio of the two compared "
             "configurations within each turn (the k-th block of steps of each; the first, with start-up, left out), "
             "median (min–max) over the turns. " if blocks else "")
    one_after = "The 3-D network's runs went one after the other, each alone on the machine. " if has_3d and not turns_3d else ""
    return turns + one_after + (f"Each configuration ran {runs} times; steps/s are medians over those runs, and each side's fastest "
                    "configuration (by median) is compared. **per round**: the ratio of both sides' fastest rows within "
                    "each round." if runs > 1 else "Each side's fastest row is compared.")


def _network(comparison: dict) -> str:
    return comparison.get("network", "mnist-multistep")  # files written before the 3-D peer name none


def comparison_label(comparison: dict) -> str:
    """The loss, and the network where it is not the MNIST one."""
    return comparison["loss"] if _network(comparison) == "mnist-multistep" else f"{comparison['loss']}, 3-D U-Net"


def per_turn(comparison: dict) -> str:
    turns = comparison.get("steps_per_second_ratio_per_turn")
    if not turns:
        return ""
    return f"{turns['median']:.2f}× ({turns['min']:.2f}–{turns['max']:.2f}×, {turns['turns']} turns)"


def experiments_run(result: dict) -> tuple[bool, bool]:
    """(the MNIST experiment, the 3-D network): which of the two a result's rows hold (a run
    without rows yet counts as the MNIST experiment, the suite's default)."""
    networks = {r.get("network") for r in result.get("rows") or []}
    return "mnist-multistep" in networks or not networks, bool(networks - {"mnist-multistep"})


def render(result: dict) -> str:
    from benchmarks._timing import code_line, cpu_label, markdown_table

    m = result["machine"]
    s = result["settings"]
    lines = [
        f"# Amortized registration: jaxreg vs icon_registration ({'quick' if s['quick'] else 'full'})",
        "",
        f"- machine: {cpu_label(m)} ({m['machine']}), os.cpu_count() = {m['cpu_count']}, "
        f"jax {m['jax']} on {', '.join(m['jax_devices'])}, torch {m.get('torch')}, icon_registration {m.get('icon_registration')}; "
        f"{result['started']}",
        code_line(result),
    ]
    mnist, network_3d = experiments_run(result)
    if mnist:
        lines.append(
            f"- experiment: MNIST multistep (MLP 1568-50-50-1568, 8 weight-shared steps), {s['steps']} training steps of "
            f"128 pairs of fives, Adam 1e-3, seed {s['seed']}; evaluation on 256 pairs of fives and 256 of sevens (test set). "
            "**steps/s**: training steps per second after the warm-up steps (icon: the first 10; jaxreg: its compiling steps, listed as "
            "**compile s**); **train s**: all steps; **peak MiB**: the process's VmHWM; **inference pairs/s**: batches "
            "of 256, no gradient. Dice of the > 0.5 masks (moving warped bilinearly); **folded**: fraction of pixels with "
            "Jacobian determinant <= 0; **objective**: SSD + λ·diffusion in jaxreg's convention (pixels). Each side "
            "computes its own accuracy numbers by the same definitions."
        )
    if network_3d:
        lines.append(
            f"- 3-D network: `examples/gradicon_3d.py --steps {s.get('steps_3d')}` (two-step U-Net, GradICON, Adam, "
            "synthetic 32³ shapes, batch 2); **steps/s** after the compiling steps; Dice over the 4 shape labels on 32 new "
            "synthetic pairs and over 35 labels on the OASIS pair (never seen in training); **folded**: fraction of voxels "
            "with Jacobian determinant <= 0. icon_registration runs `benchmarks/peers/icon_3d.py` on the same pairs with "
            "the same U-Net; its steps/s leave out drawing the batch (timed as data s/step in its metrics), which "
            "jaxreg's compiled step includes."
        )
    lines.append("")
    busy = busy_note(result)
    if busy:
        lines += [f"**{busy}**", ""]
    if result["comparisons"]:
        times = lambda v: "" if v is None else f"{v:.2f}×"  # noqa: E731
        met = {True: "yes", False: "no", None: ""}
        rows = [[comparison_label(c), times(c.get("steps_per_second_ratio")), _f(c.get("jaxreg_steps_per_second"), ".2f"),
                 _f(c.get("icon_steps_per_second"), ".2f"), c.get("jaxreg_devices", 1), c.get("icon_threads"),
                 ", ".join(times(v) for v in c.get("steps_per_second_ratio_per_round") or []), per_turn(c), f"≥ {c['target']:g}×",
                 met[c.get("meets_target")], times(c.get("inference_pairs_per_second_ratio"))]
                for c in result["comparisons"]]
        lines += ["## Speed-up", "", how_compared(result), "",
                  markdown_table(["loss", "jaxreg ÷ icon steps/s", "jaxreg steps/s", "icon steps/s", "jaxreg devices (its fastest)",
                                  "icon torch threads (its fastest)", "per round", "per turn", "target", "met",
                                  "jaxreg ÷ icon inference pairs/s"], rows), ""]
    for network in dict.fromkeys(r["network"] for r in result["rows"]):
        lines += [f"## {network}", "", *network_tables(result, network)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 training steps (3-D: 20)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 2000, quick 200)")
    parser.add_argument("--losses", default="diffusion", help=f"comma-separated subset of {','.join(LOSSES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=DEFAULT_DATA, help="mnist.npz")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for amortized.json and amortized.md")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter for the icon_registration peer")
    parser.add_argument("--icon-threads", default=None,
                        help="comma-separated torch thread counts, one icon row each (default: the cores available); "
                             "the speed-up is taken against icon's fastest row")
    parser.add_argument("--jaxreg-devices", default=None,
                        help="comma-separated device counts, one jaxreg row each (the example's --devices: on CPU, that many "
                             "XLA CPU devices sharing the batch); the speed-up is taken from jaxreg's fastest row "
                             "(default: 1,2 on a CPU with 2 or more cores, else 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every configuration this many times, the two sides in turn; speeds are medians over them "
                             "(on a machine whose speed drifts, 3 gives a steadier ratio than 1)")
    parser.add_argument("--lmbda", type=float, default=0.05,
                        help="weight of the regularity / inverse-consistency term, jaxreg's convention (both sides)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="run the configurations one after the other instead of side by side taking turns")
    parser.add_argument("--steps-3d", type=int, default=None, help="training steps of the 3-D example (default 200, quick 20)")
    parser.add_argument("--args-3d", default="", help="extra arguments for examples/gradicon_3d.py")
    parser.add_argument("--no-3d", action="store_true", help="leave out the 3-D network row")
    parser.add_argument("--only-3d", action="store_true",
                        help="run the 3-D network row alone (no MNIST comparison), into amortized-3d.json / .md")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run (default 10800, quick 1800)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, metrics.json of each run)")
    args = parser.parse_args(argv)
    if args.only_3d and args.no_3d:
        parser.error("--only-3d and --no-3d exclude each other")
    losses = [] if args.only_3d else [k.strip() for k in args.losses.split(",") if k.strip()]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        parser.error(f"unknown --losses {unknown}; choose from {list(LOSSES)}")
    cores = len(os.sched_getaffinity(0))
    args.icon_threads = [int(t) for t in (args.icon_threads or str(cores)).split(",") if t.strip()]
    if args.jaxreg_devices is None:
        import jax

        args.jaxreg_devices = "1,2" if cores >= 2 and jax.default_backend() == "cpu" else "1"
    args.jaxreg_devices = [int(t) for t in args.jaxreg_devices.split(",") if t.strip()]
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    args.steps = args.steps or (200 if args.quick else 2000)
    args.steps_3d = args.steps_3d or (20 if args.quick else 200)
    args.timeout = args.timeout or (1800.0 if args.quick else 10800.0)
    if not os.path.exists(args.data):
        parser.error(f"MNIST data not found: {args.data}")

    from benchmarks._timing import code_version, machine_info, write_atomic

    machine = machine_info()
    probe = subprocess.run([args.peer_python, "-c", "import importlib.metadata as m; print(m.version('icon_registration'))"],
                           capture_output=True, text=True)
    machine["icon_registration"] = probe.stdout.strip() or None
    start = time.perf_counter()
    result = {
        "suite": "amortized",
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "code": code_version(REPO),
        "load_average_start": os.getloadavg(),
        "settings": {"quick": args.quick, "steps": args.steps, "steps_3d": args.steps_3d, "losses": losses, "seed": args.seed,
                     "data": args.data, "peer_python": args.peer_python, "target_speedup": TARGET_SPEEDUP,
                     "threads": cores, "icon_threads": args.icon_threads, "jaxreg_devices": args.jaxreg_devices,
                     "repeats": args.repeats, "lmbda": args.lmbda, "side_by_side": not args.one_at_a_time,
                     "turns_3d": not args.one_at_a_time},
        "rows": [],
        "comparisons": [],
    }
    os.makedirs(args.out, exist_ok=True)
    stem = "amortized-3d" if args.only_3d else "amortized"  # report.py draws "<suite>-<what>.json" under its own heading
    json_path, md_path = os.path.join(args.out, stem + ".json"), os.path.join(args.out, stem + ".md")

    def save():
        result["total_s"] = time.perf_counter() - start
        result["load_average_end"] = os.getloadavg()
        result["comparisons"] = compare(result["rows"])
        write_atomic(json_path, json.dumps(result, indent=1, default=str) + "\n")
        write_atomic(md_path, render(result))

    with work_folder("jaxreg-amortized-", keep=args.keep) as workdir:
        for loss in losses:
            result["rows"] += mnist_rows(loss, args, workdir)
            save()  # after every loss, so that a run killed later still leaves its results
        if not args.no_3d:
            result["rows"] += network3d_rows(args, workdir)
        save()
    print(render(result))
    print(f"wrote {json_path} and {md_path} in {result['total_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
