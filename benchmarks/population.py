"""Population throughput: many pairs registered by one vmap-ed program against a loop.

    python benchmarks/population.py [--quick | --large] [--stage svf,greedy] [--size 96] [--host-devices N] [--out PATH]

Each of N moving images (synthetic blobs warped by random smooth velocities, 2-D,
``--size``^2) is registered to the same fixed image with the same stage and settings.
``vmap``: ``jax.jit(jax.vmap(stage))`` over the whole batch; above ``--batch-size``
pairs also ``--batch-size`` pairs at a time in a ``lax.map`` (what
``register_many(..., batch_size=k)`` runs); ``loop``: one jitted single-pair program
called N times; ``register_many``: the library's default call on one device (on CPU,
chunks of about ``jaxreg.population.CPU_CHUNK_VOXELS`` voxels run from one host thread per
core; on an accelerator one vmap, as the vmap row); ``sharded``: ``register_many(stage, ..., devices=k)``, the batch split
over k devices. On CPU the script makes each core a device
(``XLA_FLAGS=--xla_force_host_platform_device_count``, set before JAX starts; ``--host-devices``,
default the core count; 1 leaves it off), so the sharded row is what a CPU user gets
by exposing the cores that way; the vmap and loop programs run on device 0, as without
the flag. All are compiled before timing (compile time reported apart), so the ratio
is pure throughput. Writes ``benchmarks/results/population.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def _host_devices_parser() -> argparse.ArgumentParser:
    # Shared with main's parser, which takes it as a parent: the option is read once before
    # JAX starts (the flag works only then) and again, the same way, with the rest.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host-devices", type=int, default=os.cpu_count() or 1,
                        help="on CPU, expose this many devices (default: the core count) for the sharded row; 1: none")
    return parser


def _host_devices_from(argv) -> int:
    return _host_devices_parser().parse_known_args(argv)[0].host_devices


if __name__ == "__main__":
    # Only as a script: the flag takes effect only before JAX starts, and importers (the
    # tests) keep their own JAX.
    _count = _host_devices_from(sys.argv[1:])
    if _count > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_count}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import block, code_version, cpu_label, machine_info, markdown_table, results_suffix, time_in_rounds, write_atomic  # noqa: E402

from jaxreg import synthetic  # noqa: E402
from jaxreg.population import CPU_CHUNK_VOXELS, pair_sharding, plan, register_many  # noqa: E402
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

    devices = jax.device_count()
    # Sharded in chunks: as many pairs in flight as the one-device chunks, batch_size / devices
    # on each device: 32 a device outgrew the cache (128 svf pairs, 2 devices: 99 pairs/s
    # against 105-106 with 16 or 8 a device).
    per_device = max(1, batch_size // devices)
    rows = []
    for n in counts:
        fixed, moving = make_batch(n, size)
        start = time.perf_counter()
        batched = jax.jit(jax.vmap(one)).lower(fixed, moving).compile()
        vmap_compile = time.perf_counter() - start
        start = time.perf_counter()
        single = jax.jit(one).lower(fixed[0], moving[0]).compile()
        loop_compile = time.perf_counter() - start
        programs = {"vmap": lambda: batched(fixed, moving), "loop": lambda: [single(fixed[i], moving[i]) for i in range(n)],
                    "library": lambda: register_many(stage, fixed, moving, **options)}
        library_batch_size, library_threads, library_chunks = plan(fixed.shape, jax.devices()[0].platform)
        compile_s = {}
        if n > batch_size:
            # What register_many(..., batch_size=k) runs: k pairs at a time in a lax.map.
            start = time.perf_counter()
            in_chunks = jax.jit(lambda f, m: jax.lax.map(lambda pair: one(*pair), (f, m), batch_size=batch_size))
            in_chunks = in_chunks.lower(fixed, moving).compile()
            compile_s["chunked"] = time.perf_counter() - start
            programs["chunked"] = lambda: in_chunks(fixed, moving)
        if devices > 1 and n % devices == 0:
            # The library's own call, its inputs already placed as it places them.
            sharding = pair_sharding()
            on_devices = (jax.device_put(fixed, sharding), jax.device_put(moving, sharding))
            programs["sharded"] = lambda: register_many(stage, *on_devices, devices=devices, **options)
            if n > batch_size:
                programs["sharded_chunked"] = lambda: register_many(stage, *on_devices, devices=devices, batch_size=per_device, **options)
        first_call_s = {}
        for name, program in programs.items():  # warm-up; register_many compiles in its first call
            start = time.perf_counter()
            block(program())
            first_call_s[name] = time.perf_counter() - start
        # In rounds, each program once per round: a slow spell of the machine hits all alike.
        rounds = dict(zip(programs, time_in_rounds(list(programs.values()), repeats)))
        times = {name: statistics.median(t) for name, t in rounds.items()}
        vmap_s, loop_s = times["vmap"], times["loop"]
        extra = {}
        if "chunked" in times:
            extra.update(batch_size=batch_size, chunked_pairs_per_s=n / times["chunked"],
                         chunked_speedup=loop_s / times["chunked"], chunked_compile_s=compile_s["chunked"])
        per_round = speedup_of_rounds(rounds["library"], rounds["loop"])
        extra.update(library_pairs_per_s=n / times["library"], library_speedup=loop_s / times["library"],
                     library_speedup_min=per_round["speedup_min"], library_speedup_max=per_round["speedup_max"],
                     library_threads=library_threads, library_calls=len(library_chunks),
                     library_batch_size=library_batch_size, library_compile_s=first_call_s["library"] - times["library"])
        if "sharded" in times:
            per_round = speedup_of_rounds(rounds["sharded"], rounds["loop"])
            extra.update(devices=devices, sharded_pairs_per_s=n / times["sharded"], sharded_speedup=loop_s / times["sharded"],
                         sharded_speedup_min=per_round["speedup_min"], sharded_speedup_max=per_round["speedup_max"],
                         sharded_compile_s=first_call_s["sharded"] - times["sharded"])
        if "sharded_chunked" in times:
            extra.update(sharded_batch_size=per_device, sharded_chunked_pairs_per_s=n / times["sharded_chunked"],
                         sharded_chunked_speedup=loop_s / times["sharded_chunked"])
        rows.append(
            dict(
                stage=stage_name,
                pairs=n,
                size=size,
                vmap_s=vmap_s,
                loop_s=loop_s,
                vmap_pairs_per_s=n / vmap_s,
                loop_pairs_per_s=n / loop_s,
                **speedup_of_rounds(rounds["vmap"], rounds["loop"]),
                vmap_compile_s=vmap_compile,
                loop_compile_s=loop_compile,
                **extra,
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
        "Median of repeated runs, taken in rounds (each program once per round, in turn, after one warm-up call); compile excluded and listed apart (the loop program is compiled once, so after the first count it comes from JAX's cache). **per round**: the lowest and highest of the vmap / loop ratios of single rounds: the spread the host's noise gives one measurement (the median columns are of the times, not of these ratios). "
        "**register_many**: the library's default call on one device; **calls on threads**: how many vmapped calls it made and how many host threads ran them at once.",
        "",
    ]
    chunk = lambda r, key, spec: format(r[key], spec) if key in r else ""  # noqa: E731
    rows = [
        [r["stage"], f"{r['size']}^2", r["pairs"], f"{r['vmap_pairs_per_s']:.2f}", f"{r['loop_pairs_per_s']:.2f}",
         f"{r['speedup']:.2f}x", f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if "speedup_min" in r else "", chunk(r, "chunked_pairs_per_s", ".2f"), chunk(r, "chunked_speedup", ".2f") + ("x" if "chunked_speedup" in r else ""),
         chunk(r, "library_pairs_per_s", ".2f"), chunk(r, "library_speedup", ".2f") + ("x" if "library_speedup" in r else ""),
         f"{r['library_speedup_min']:.2f}-{r['library_speedup_max']:.2f}" if "library_speedup_min" in r else "",
         f"{r['library_calls']} on {r['library_threads']}" if "library_calls" in r else "",
         chunk(r, "sharded_pairs_per_s", ".2f"), chunk(r, "sharded_speedup", ".2f") + ("x" if "sharded_speedup" in r else ""),
         f"{r['sharded_speedup_min']:.2f}-{r['sharded_speedup_max']:.2f}" if "sharded_speedup_min" in r else "",
         chunk(r, "sharded_chunked_speedup", ".2f") + ("x" if "sharded_chunked_speedup" in r else ""),
         f"{r['vmap_compile_s']:.1f}", f"{r['loop_compile_s']:.1f}"]
        for r in result["rows"]
    ]
    size = result["settings"].get("batch_size", 32)
    devices = result["settings"].get("devices", 1)
    lines.append(markdown_table(["stage", "size", "pairs", "vmap pairs/s", "loop pairs/s", "vmap / loop",
                                 "per round", f"vmap {size} at a time pairs/s", f"{size} at a time / loop",
                                 "register_many pairs/s", "register_many / loop", "register_many per round",
                                 "calls on threads", f"sharded over {devices} pairs/s", "sharded / loop", "sharded per round",
                                 f"sharded, {size} in flight / loop", "vmap compile s", "loop compile s"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[_host_devices_parser()])
    parser.add_argument("--quick", action="store_true", help="1 and 8 pairs, 48^2, few steps")
    parser.add_argument("--large", action="store_true", help="also 128 pairs (about 10 more minutes on 2 cores)")
    parser.add_argument("--stage", default="svf,greedy")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="above this many pairs, also time them this many at a time (register_many's batch_size)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per count (each program once per round)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/population.json; "
                        "population-gpu.json where JAX computes on a GPU)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"population{results_suffix()}.json")
    counts = (1, 8) if args.quick else (1, 8, 32, 128) if args.large else (1, 8, 32)
    size = 48 if args.quick else args.size
    steps = 10 if args.quick else 40
    result = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_version(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "settings": {"quick": args.quick, "size": size, "steps": steps, "counts": counts, "batch_size": args.batch_size, "rounds": args.rounds,
                     "devices": jax.device_count(), "cpu_chunk_voxels": CPU_CHUNK_VOXELS, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "rows": [],
    }
    for stage in args.stage.split(","):
        result["rows"] += run(stage.strip(), counts, size, steps, repeats=args.rounds, batch_size=args.batch_size)
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
        write_atomic(os.path.splitext(args.out)[0] + ".md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
