"""Population throughput: many pairs registered by one vmap-ed program against a loop.

    python benchmarks/population.py [--quick | --large] [--stage svf,greedy] [--size 96] [--out PATH]

Each of N moving images (synthetic blobs warped by random smooth velocities, 2-D,
``--size``^2) is registered to the same fixed image with the same stage and settings.
``vmap``: ``jax.jit(jax.vmap(stage))`` over the whole batch; above ``--batch-size``
pairs also ``--batch-size`` pairs at a time in a ``lax.map`` (what
``register_many(..., batch_size=k)`` runs); ``loop``: one jitted single-pair program
called N times. Both are compiled once before timing (compile time
reported apart), so the ratio is pure throughput. Writes
``benchmarks/results/population.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import block, code_version, cpu_label, machine_info, markdown_table, time_in_rounds, write_atomic  # noqa: E402

from jaxreg import synthetic  # noqa: E402
from jaxreg.grid import Grid, Image  # noqa: E402
from jaxreg.registration import register_greedy, register_svf  # noqa: E402
from jaxreg.transforms import warp  # noqa: E402

STAGES = {"svf": register_svf, "greedy": register_greedy}


def make_batch(n: int, size: int):
    grid = Grid((size, size))
    fixed, _ = synthetic.blobs(jax.random.PRNGKey(0), grid.shape)
    moving = jnp.stack(
        [warp(fixed, synthetic.random_velocity(jax.random.PRNGKey(i + 1), grid, amplitude=3.0, smoothness=12.0)) for i in range(n)]
    )
    return jnp.broadcast_to(fixed, moving.shape), moving


def speedup_of_rounds(vmap_times, loop_times) -> dict:
    """loop / vmap from the median times, and the lowest and highest ratio of one round
    (the two programs timed back to back), whose spread says how far one median can be trusted."""
    per_round = [loop / batched for batched, loop in zip(vmap_times, loop_times, strict=True)]
    return dict(speedup=statistics.median(loop_times) / statistics.median(vmap_times),
                speedup_min=min(per_round), speedup_max=max(per_round), rounds=len(per_round))


def run(stage_name: str, counts, size: int, steps: int, repeats: int, batch_size: int) -> list[dict]:
    stage = STAGES[stage_name]
    options = dict(shrink=(2, 1), steps=(steps, steps // 2), optimizer=optax.adam(0.5))

    def one(f, m):
        field, _ = stage(Image(f), Image(m), **options)
        return field.field

    rows = []
    for n in counts:
        fixed, moving = make_batch(n, size)
        start = time.perf_counter()
        batched = jax.jit(jax.vmap(one)).lower(fixed, moving).compile()
        vmap_compile = time.perf_counter() - start
        start = time.perf_counter()
        single = jax.jit(one).lower(fixed[0], moving[0]).compile()
        loop_compile = time.perf_counter() - start
        programs = [lambda: batched(fixed, moving), lambda: [single(fixed[i], moving[i]) for i in range(n)]]
        chunked = {}
        if n > batch_size:
            # What register_many(..., batch_size=k) runs: k pairs at a time in a lax.map.
            start = time.perf_counter()
            in_chunks = jax.jit(lambda f, m: jax.lax.map(lambda pair: one(*pair), (f, m), batch_size=batch_size))
            in_chunks = in_chunks.lower(fixed, moving).compile()
            chunked_compile = time.perf_counter() - start
            programs.append(lambda: in_chunks(fixed, moving))
        for program in programs:  # warm-up
            block(program())
        # In rounds, each program once per round: a slow spell of the machine hits all alike.
        rounds = time_in_rounds(programs, repeats)
        times = [statistics.median(t) for t in rounds]
        vmap_s, loop_s = times[:2]
        if n > batch_size:
            chunked = dict(batch_size=batch_size, chunked_pairs_per_s=n / times[2],
                           chunked_speedup=loop_s / times[2], chunked_compile_s=chunked_compile)
        rows.append(
            dict(
                stage=stage_name,
                pairs=n,
                size=size,
                vmap_s=vmap_s,
                loop_s=loop_s,
                vmap_pairs_per_s=n / vmap_s,
                loop_pairs_per_s=n / loop_s,
                **speedup_of_rounds(rounds[0], rounds[1]),
                vmap_compile_s=vmap_compile,
                loop_compile_s=loop_compile,
                **chunked,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Population throughput: vmap vs loop",
        "",
        f"{result['started']} on {cpu_label(m)} ({m.get('cpu_count', '?')} cores), jax {m.get('jax', '?')}. "
        "Median of repeated runs, taken in rounds (each program once per round, in turn, after one warm-up call); compile excluded and listed apart (the loop program is compiled once, so after the first count it comes from JAX's cache). **per round**: the lowest and highest of the vmap / loop ratios of single rounds: the spread the host's noise gives one measurement (the median columns are of the times, not of these ratios).",
        "",
    ]
    chunk = lambda r, key, spec: format(r[key], spec) if key in r else ""  # noqa: E731
    rows = [
        [r["stage"], f"{r['size']}^2", r["pairs"], f"{r['vmap_pairs_per_s']:.2f}", f"{r['loop_pairs_per_s']:.2f}",
         f"{r['speedup']:.2f}x", f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if "speedup_min" in r else "", chunk(r, "chunked_pairs_per_s", ".2f"), chunk(r, "chunked_speedup", ".2f") + ("x" if "chunked_speedup" in r else ""),
         f"{r['vmap_compile_s']:.1f}", f"{r['loop_compile_s']:.1f}"]
        for r in result["rows"]
    ]
    size = result["settings"].get("batch_size", 32)
    lines.append(markdown_table(["stage", "size", "pairs", "vmap pairs/s", "loop pairs/s", "vmap / loop",
                                 "per round", f"vmap {size} at a time pairs/s", f"{size} at a time / loop", "vmap compile s", "loop compile s"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 8 pairs, 48^2, few steps")
    parser.add_argument("--large", action="store_true", help="also 128 pairs (about 10 more minutes on 2 cores)")
    parser.add_argument("--stage", default="svf,greedy")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="above this many pairs, also time them this many at a time (register_many's batch_size)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per count (each program once per round)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "population.json"))
    args = parser.parse_args(argv)
    counts = (1, 8) if args.quick else (1, 8, 32, 128) if args.large else (1, 8, 32)
    size = 48 if args.quick else args.size
    steps = 10 if args.quick else 40
    result = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_version(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "settings": {"quick": args.quick, "size": size, "steps": steps, "counts": counts, "batch_size": args.batch_size, "rounds": args.rounds},
        "rows": [],
    }
    for stage in args.stage.split(","):
        result["rows"] += run(stage.strip(), counts, size, steps, repeats=args.rounds, batch_size=args.batch_size)
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
        write_atomic(os.path.splitext(args.out)[0] + ".md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
