"""MNIST multistep experiment: one small MLP, applied 8 times with shared weights, learns to register 5s.

    python examples/mnist_multistep.py --steps 2000 --out results/mnist
    python examples/mnist_multistep.py --loss gradicon --out results/mnist-gradicon

The inner network sees the two 28x28 images concatenated (1568 -> 50 -> 50 -> 1568, ReLU)
and outputs a 2x28x28 displacement (pixels); :class:`jaxreg.nn.Multistep` applies it 8
times (warp, look again, compose; ICON's TwoStep with one set of weights), a learned
iterative optimizer. Trained on random pairs of the digit 5 with Adam (lr 1e-3, batch
128) on ``SSD + 0.05 x diffusion`` (``--loss diffusion``) or the ICON / GradICON losses,
then evaluated on held-out pairs of 5s and of 7s (out of distribution).

Data: ``--data`` is ``mnist.npz`` (``x_train`` grouped by digit, so it is shuffled with
``--seed`` first) or a folder of the four standard IDX files. Evaluation pairs are the
digit-5 and digit-7 images of the test split, 256 pairs each, drawn with
``numpy.random.default_rng(seed + 1)`` (fives first, then sevens), so other tools can
score the very same pairs (``benchmarks/peers/icon_mnist.py`` does).

Writes ``DIR/metrics.json``, ``DIR/model.ckpt`` (reload with
``jaxreg.nn.training.restore_model``), ``DIR/log.jsonl`` and ``DIR/sevens.png``: 7-pairs
(moving, fixed, the image after each step, the final warp and its deformed grid). The
network, trained only on 5s, sometimes bends a 7 towards a 5 on the way: ``sevens``'s
``five_likeness`` measures that as the correlation of the warped 7 with the mean training 5
minus that of the moving 7, after every step, and the fraction of pairs where it rises by
more than 0.1 at some step.
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
from _common import SHARED_DATA, benchmark_turn, block_steps_per_second, training_devices, write_metrics  # noqa: E402

import jaxreg.nn as jnn  # noqa: E402
from jaxreg import datasets, viz  # noqa: E402
from jaxreg.grid import Grid  # noqa: E402
from jaxreg.losses import regularizers  # noqa: E402
from jaxreg.transforms import Displacement, jacobian_determinant, warp  # noqa: E402

SHAPE = (28, 28)
EVAL_PAIRS = 256
BLOCK = 50  # training steps per chunk of jnn.train, and per turn when a benchmark runs this beside its peer
DEFAULT_LMBDA = {"diffusion": 0.05, "icon": 0.05, "gradicon": 0.05}
SPEC = {"name": "mnist-multistep", "kwargs": {"shape": list(SHAPE), "hidden": [50, 50], "steps": 8}}


def make_loss(name: str, lmbda: float):
    if name == "diffusion":
        return jnn.regularized(lmbda=lmbda)
    if name == "icon":
        return jnn.icon(lmbda=lmbda)
    if name == "gradicon":
        return jnn.gradicon(lmbda=lmbda)
    raise ValueError(f"unknown loss {name!r}")


def load_digits(path: Path, seed: int):
    data = datasets.load_mnist(path)
    scale = lambda x: (np.asarray(x, np.float32) / 255.0)  # noqa: E731
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    x_train, y_train = scale(data.x_train)[order], data.y_train[order]
    x_test = scale(data.x_test)
    rng = np.random.default_rng(seed + 1)
    fives = datasets.eval_pairs(x_test[data.y_test == 5], EVAL_PAIRS, rng)
    sevens = datasets.eval_pairs(x_test[data.y_test == 7], EVAL_PAIRS, rng)
    return x_train[y_train == 5], fives, sevens


def _correlation(a, b):
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    return (a * b).sum(axis=(-2, -1)) / np.sqrt((a * a).sum(axis=(-2, -1)) * (b * b).sum(axis=(-2, -1)) + 1e-12)


def _dice(a, b):
    a, b = a > 0.5, b > 0.5
    return 2.0 * (a & b).sum(axis=(-2, -1)) / np.maximum(a.sum(axis=(-2, -1)) + b.sum(axis=(-2, -1)), 1)


def evaluate(model, pairs: dict, lmbda: float, mean_five: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Scores on the pairs; also the per-step warped images ``(pairs, steps, 28, 28)`` and final fields."""
    grid = Grid(SHAPE)

    @jax.jit
    def run(moving, fixed):
        def one(m, f):
            fields = model.trajectory(m, f)
            warped = jax.vmap(lambda u: warp(m, Displacement(u), order=1, mode="constant"))(fields)
            det = jacobian_determinant(Displacement(fields[-1]), grid)
            return warped, fields[-1], det, regularizers.diffusion()(fields[-1])

        return jax.vmap(one)(moving, fixed)

    warped_steps, fields, det, diffusion = (np.asarray(a) for a in run(pairs["moving"], pairs["fixed"]))
    moving, fixed, warped = pairs["moving"], pairs["fixed"], warped_steps[:, -1]
    ssd_before = ((moving - fixed) ** 2).mean(axis=(-2, -1))
    ssd_after = ((warped - fixed) ** 2).mean(axis=(-2, -1))
    like_before = _correlation(moving, mean_five)
    like_steps = _correlation(warped_steps, mean_five[None, None]) - like_before[:, None]
    scores = {
        "pairs": int(len(moving)),
        "ssd_before": float(ssd_before.mean()),
        "ssd_after": float(ssd_after.mean()),
        "dice_before": float(_dice(moving, fixed).mean()),
        "dice_after": float(_dice(warped, fixed).mean()),
        "folded_fraction": float((det <= 0).mean()),
        "objective_after": float((ssd_after + lmbda * diffusion).mean()),
        "five_likeness": {
            "moving_vs_mean_five": float(like_before.mean()),
            "gain_after_step": [float(v) for v in like_steps.mean(axis=0)],
            "fraction_of_pairs_gaining_over_0.1": float((like_steps.max(axis=1) > 0.1).mean()),
            "fixed_correlation_after_step": [float(v) for v in _correlation(warped_steps, fixed[:, None]).mean(axis=0)],
        },
    }
    return scores, warped_steps, fields


def figure(path: Path, pairs: dict, warped_steps, fields, count: int = 6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = warped_steps.shape[1]
    columns = 2 + steps + 1
    fig, axes = plt.subplots(count, columns, figsize=(1.3 * columns, 1.4 * count))
    grid = Grid(SHAPE)
    for row in range(count):
        panels = [pairs["moving"][row], pairs["fixed"][row], *warped_steps[row]]
        titles = ["moving 7", "fixed 7", *(f"step {k + 1}" for k in range(steps))]
        for col, (image, title) in enumerate(zip(panels, titles)):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
        ax = axes[row, -1]
        viz.deformed_grid(Displacement(jnp.asarray(fields[row])), grid, ax=ax, spacing=3, background=warped_steps[row, -1])
        ax.set_axis_off()
        if row == 0:
            ax.set_title("grid", fontsize=8)
    fig.tight_layout()
    viz.save_figure(fig, path, overwrite=True, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("results/mnist"))
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "mnist" / "mnist.npz")
    parser.add_argument("--loss", choices=sorted(DEFAULT_LMBDA), default="diffusion")
    parser.add_argument("--lmbda", type=float, default=None, help="weight of the regularity / inverse-consistency term")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--devices", type=int, default=1,
                        help="shard each batch over this many devices; on a machine without an accelerator, "
                             "that many XLA CPU devices (2 on 2 cores: 3.5-11%% more steps/s than one device in "
                             "benchmarks/results/amortized.md)")
    args = parser.parse_args(argv)
    devices = training_devices(args.devices)
    lmbda = DEFAULT_LMBDA[args.loss] if args.lmbda is None else args.lmbda
    args.out.mkdir(parents=True, exist_ok=True)

    train_fives, eval_fives, eval_sevens = load_digits(args.data, args.seed)
    sampler = datasets.pair_sampler(train_fives, batch_size=args.batch)
    model = jnn.build(SPEC)
    turn = benchmark_turn()
    model, state, history = jnn.train(
        model, make_loss(args.loss, lmbda), sampler, optax.adam(args.lr), steps=args.steps, seed=args.seed,
        log_every=BLOCK, checkpoint=args.out / "model.ckpt", resume=False, spec=SPEC, log_file=args.out / "log.jsonl",
        devices=devices, before_chunk=turn,
    )
    if turn is not None:
        turn()  # evaluation and the inference timing below run in a turn of their own
    train_seconds = sum(h["seconds"] for h in history)  # the training chunks, compilation included
    compile_seconds = history[0]["compile_seconds"] if history else 0.0
    timed = history[1:]
    steps_timed = sum(b["step"] - a["step"] for a, b in zip(history[:-1], history[1:]))
    steps_per_second = steps_timed / sum(h["seconds"] for h in timed) if timed else float("nan")

    infer = jax.jit(jax.vmap(lambda m, f: model(m, f).field))
    batch = jnp.asarray(eval_fives["moving"]), jnp.asarray(eval_fives["fixed"])
    jax.block_until_ready(infer(*batch))
    t0 = time.perf_counter()
    jax.block_until_ready(infer(*batch))
    inference_pairs_per_second = len(batch[0]) / (time.perf_counter() - t0)

    mean_five = train_fives.mean(axis=0)
    fives, _, _ = evaluate(model, eval_fives, lmbda, mean_five)
    sevens, warped_steps, fields = evaluate(model, eval_sevens, lmbda, mean_five)
    figure(args.out / "sevens.png", eval_sevens, warped_steps, fields)

    metrics = {
        "experiment": "mnist-multistep",
        "loss": args.loss,
        "lmbda": lmbda,
        "steps": args.steps,
        "batch": args.batch,
        "learning_rate": args.lr,
        "seed": args.seed,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "steps_per_second": steps_per_second,
        "block_steps": BLOCK,
        "block_steps_per_second": block_steps_per_second(history),
        "final_loss": float(np.mean([h["loss"] for h in history[-1:]])) if history else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "inference_pairs_per_second": inference_pairs_per_second,
        "device": jax.devices()[0].device_kind,
        "devices": args.devices,
        "fives": fives,
        "sevens": sevens,
    }
    write_metrics(args.out, metrics)
    print(f"{args.loss}: {steps_per_second:.1f} steps/s (compile {compile_seconds:.1f} s); "
          f"fives Dice {fives['dice_before']:.3f} -> {fives['dice_after']:.3f}, "
          f"sevens Dice {sevens['dice_before']:.3f} -> {sevens['dice_after']:.3f}, "
          f"folds {fives['folded_fraction']:.4f}/{sevens['folded_fraction']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
