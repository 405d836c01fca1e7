"""GradICON with a U-Net in 3-D: trained on synthetic shapes the package makes, tested on OASIS.

    python examples/gradicon_3d.py --out results/gradicon3d                # defaults below
    python examples/gradicon_3d.py --steps 50 --size 24 --out /tmp/g3d      # a quick look

Training pairs are drawn inside the compiled training step: ``jaxreg.synthetic.blobs``
(ellipsoids with labels) as the fixed image and the same image warped by a random smooth
diffeomorphism (``synthetic.random_velocity``) as the moving one, ``--size``³ voxels. The
network is ``jaxreg.nn.models.unet_two_step``: a U-Net displacement net at half
resolution, then one at full resolution on the warped image (ICON's coarse-to-fine
pair), trained with the GradICON loss (``--lmbda``) on MSE, Adam.

Evaluation:

- on 32 new synthetic pairs: mean Dice of the 4 labels before/after, % folded voxels;
- on the OASIS pair in ``../shared/data/oasis`` (both directions), if present: both brains
  resampled to the network's input grid (``--oasis-shape``, over the same extent) by
  :func:`jaxreg.nn.inference.register_images`, the transform lifted back to world space,
  the labels warped at full resolution (nearest): mean Dice over the 35 labels before and
  after, % of voxels with a non-positive Jacobian. The network never saw a brain: this is
  an out-of-distribution test of what a shape-trained net carries over, not a tuned brain
  model.

Writes ``DIR/metrics.json``, ``DIR/model.ckpt``, ``DIR/log.jsonl`` and ``DIR/oasis.png``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OASIS, benchmark_turn, block_steps_per_second, oasis_path, training_devices, write_metrics  # noqa: E402

import jaxreg  # noqa: E402
import jaxreg.nn as jnn  # noqa: E402
from jaxreg import metrics, synthetic, viz  # noqa: E402
from jaxreg.grid import Grid  # noqa: E402
from jaxreg.nn import inference  # noqa: E402
from jaxreg.transforms import Displacement, jacobian_determinant, warp  # noqa: E402

LABELS = (1, 2, 3, 4)
BLOCK = 25  # training steps per chunk of jnn.train, and per turn when a benchmark runs this beside its peer


def spec(features):
    return {"name": "unet-two-step", "kwargs": {"ndim": 3, "features": list(features)}}


def synthetic_sampler(size: int, batch_size: int, amplitude: float):
    shape = (size,) * 3
    grid = Grid(shape)

    def one(key):
        k_image, k_warp = jax.random.split(key)
        fixed, fixed_labels = synthetic.blobs(k_image, shape, labels=len(LABELS))
        velocity = synthetic.random_velocity(k_warp, grid, amplitude=amplitude, smoothness=size / 4)
        moving = warp(fixed, velocity)
        moving_labels = warp(fixed_labels, velocity, order=0)
        return {"moving": moving, "fixed": fixed, "moving_labels": moving_labels, "fixed_labels": fixed_labels}

    def sample(key):
        return jax.vmap(one)(jax.random.split(key, batch_size))

    return sample


def evaluate_synthetic(model, sampler, key):
    batch = sampler(key)
    grid = Grid(batch["fixed"].shape[1:])
    fields = jax.lax.map(jax.jit(lambda pair: Displacement.from_transform(model(pair["moving"], pair["fixed"]), grid).field), batch)
    return score_synthetic(batch, fields)


def score_synthetic(batch, fields):
    """Mean Dice of the 4 labels before/after and the folded fraction, for pairs ``batch``
    and their displacements ``fields`` ``(pairs, *shape, 3)`` in voxels of the fixed grid
    (shared with ``benchmarks/peers/icon_3d.py``, so that both tools are scored alike)."""
    grid = Grid(batch["fixed"].shape[1:])

    @jax.jit
    def run(pair_and_field):
        pair, field = pair_and_field
        u = Displacement(field)
        warped_labels = warp(pair["moving_labels"], u, order=0)
        return (
            metrics.mean_dice(pair["moving_labels"], pair["fixed_labels"], labels=LABELS),
            metrics.mean_dice(warped_labels, pair["fixed_labels"], labels=LABELS),
            jnp.mean(jacobian_determinant(u, grid) <= 0),
        )

    before, after, folds = (np.asarray(a) for a in jax.lax.map(run, (batch, jnp.asarray(fields))))
    return {"pairs": int(len(before)), "dice_before": float(before.mean()), "dice_after": float(after.mean()), "folded_fraction": float(folds.mean())}


def evaluate_oasis(register, out: Path):
    """Both directions of the OASIS pair; ``register(fixed, moving)`` returns an
    :class:`jaxreg.nn.inference.Prediction` (:func:`inference.register_images` here, the
    icon network in ``benchmarks/peers/icon_3d.py``)."""
    labels = tuple(range(1, 36))
    subjects = {}
    for subject in (1, 2):
        image = jaxreg.load(oasis_path(subject, "aligned_norm.nii.gz"))
        seg = jaxreg.load(oasis_path(subject, "aligned_seg35.nii.gz"), dtype=np.int32)
        subjects[subject] = (image, seg)
    results = {}
    for fixed_id, moving_id in ((1, 2), (2, 1)):
        fixed, fixed_seg = subjects[fixed_id]
        moving, moving_seg = subjects[moving_id]
        t0 = time.perf_counter()
        prediction = register(fixed, moving)
        jax.block_until_ready(prediction.warped.data)
        seconds = time.perf_counter() - t0
        warped_seg = warp(moving_seg, prediction.transform, fixed.grid, order=0)
        field = Displacement.from_transform(prediction.transform, prediction.grid)
        det = jacobian_determinant(field, prediction.grid)
        results[f"{fixed_id:04d}<-{moving_id:04d}"] = {
            "dice_before": float(metrics.mean_dice(warp(moving_seg, jaxreg.Affine.identity(3), fixed.grid, order=0).data, fixed_seg.data, labels=labels)),
            "dice_after": float(metrics.mean_dice(warped_seg.data, fixed_seg.data, labels=labels)),
            "folded_percent_on_network_grid": float(100.0 * jnp.mean(det <= 0)),
            "seconds": seconds,
        }
        if fixed_id == 1:
            viz.report(fixed, moving, prediction.warped, prediction.transform, out / "oasis.png", overwrite=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=32, help="edge of the synthetic training volumes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lmbda", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--amplitude", type=float, default=3.0, help="largest velocity of the synthetic warps, voxels")
    parser.add_argument("--features", default="8,16,16,32")
    parser.add_argument("--oasis-shape", default="80,96,112", help="network input grid for the OASIS test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1,
                        help="shard each batch over this many devices; on a machine without an accelerator, that many "
                             "XLA CPU devices (XLA CPU runs each convolution on one thread, so one device per core "
                             "lets the pairs' convolutions run at once)")
    parser.add_argument("--out", type=Path, default=Path("results/gradicon3d"))
    args = parser.parse_args(argv)
    devices = training_devices(args.devices)
    features = tuple(int(f) for f in args.features.split(","))
    args.out.mkdir(parents=True, exist_ok=True)

    model_spec = spec(features)
    model = jnn.build(model_spec)
    sampler = synthetic_sampler(args.size, args.batch, args.amplitude)
    turn = benchmark_turn()
    model, state, history = jnn.train(
        model, jnn.gradicon(lmbda=args.lmbda), sampler, optax.adam(args.lr), steps=args.steps, seed=args.seed,
        log_every=max(1, min(BLOCK, args.steps)), checkpoint=args.out / "model.ckpt", resume=False, spec=model_spec,
        log_file=args.out / "log.jsonl", before_chunk=turn, devices=devices,
    )
    if turn is not None:
        turn()  # the evaluation below runs in a turn of its own
    train_seconds = sum(h["seconds"] for h in history)  # the training chunks, compilation included; not the waits for a turn
    timed = history[1:]
    steps_timed = sum(b["step"] - a["step"] for a, b in zip(history[:-1], history[1:]))
    result = {
        "experiment": "gradicon-unet-3d",
        "steps": args.steps,
        "size": args.size,
        "batch": args.batch,
        "lmbda": args.lmbda,
        "features": list(features),
        "train_seconds": train_seconds,
        "compile_seconds": history[0]["compile_seconds"] if history else 0.0,
        "steps_per_second": steps_timed / sum(h["seconds"] for h in timed) if timed else float("nan"),
        "block_steps": BLOCK,
        "block_steps_per_second": block_steps_per_second(history),
        "final_loss": history[-1]["loss"] if history else float("nan"),
        "synthetic": evaluate_synthetic(model, synthetic_sampler(args.size, 32, args.amplitude), jax.random.key(args.seed + 1000)),
        "device": jax.devices()[0].device_kind,
        "devices": args.devices,
    }
    if oasis_path(1, "aligned_norm.nii.gz").exists():
        input_shape = tuple(int(n) for n in args.oasis_shape.split(","))
        result["oasis"] = evaluate_oasis(lambda f, m: inference.register_images(model, f, m, input_shape=input_shape), args.out)
    else:
        result["oasis"] = f"skipped: no OASIS data under {OASIS}"
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    write_metrics(args.out, result)
    print_summary(result)
    return 0


def print_summary(result: dict, prefix: str = "") -> None:
    print(f"{prefix}synthetic Dice {result['synthetic']['dice_before']:.3f} -> {result['synthetic']['dice_after']:.3f}, "
          f"folds {result['synthetic']['folded_fraction']:.4f}; {result['steps_per_second']:.2f} steps/s")
    if isinstance(result["oasis"], dict):
        for name, r in result["oasis"].items():
            print(f"OASIS {name}: Dice {r['dice_before']:.3f} -> {r['dice_after']:.3f}, folds {r['folded_percent_on_network_grid']:.3f} %")


if __name__ == "__main__":
    raise SystemExit(main())
