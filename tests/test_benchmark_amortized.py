"""The amortized suite's comparison: medians over repeats, each side's fastest configuration."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import amortized  # noqa: E402


def _row(tool, speed, repeat, **config):
    return {"network": "mnist-multistep", "loss": "diffusion", "tool": tool, "status": "ok", "repeat": repeat,
            "summary": {"steps_per_second": speed, "inference_pairs_per_second": 10 * speed}, **config}


def test_compare_takes_medians_over_repeats_and_the_fastest_configuration():
    rows = [
        _row("jaxreg", 30.0, 1, devices=1), _row("jaxreg", 33.0, 1, devices=2), _row("icon_registration", 10.0, 1, threads=2),
        _row("jaxreg", 20.0, 2, devices=1), _row("jaxreg", 27.0, 2, devices=2), _row("icon_registration", 9.0, 2, threads=2),
        _row("jaxreg", 28.0, 3, devices=1), _row("jaxreg", 30.0, 3, devices=2), _row("icon_registration", 12.0, 3, threads=2),
    ]
    (record,) = amortized.compare(rows)
    # devices=2: median of 33, 27, 30 is 30; devices=1: 28. icon: median of 10, 9, 12 is 10.
    assert record["jaxreg_devices"] == 2 and record["icon_threads"] == 2
    assert record["steps_per_second_ratio"] == pytest.approx(3.0)
    assert record["meets_target"] is True
    assert record["steps_per_second_ratio_per_round"] == pytest.approx([3.3, 3.0, 2.5])
    assert record["runs_per_config"] == 3


def test_compare_with_one_run_per_configuration_has_no_rounds():
    rows = [_row("jaxreg", 25.0, None, devices=1), _row("icon_registration", 10.0, None, threads=1),
            _row("icon_registration", 12.5, None, threads=2)]
    (record,) = amortized.compare(rows)
    assert record["steps_per_second_ratio"] == pytest.approx(2.0) and record["meets_target"] is False
    assert "steps_per_second_ratio_per_round" not in record


def test_compare_gives_the_ratio_within_each_turn_taken_side_by_side():
    def row(tool, speed, blocks, **config):
        r = _row(tool, speed, None, side_by_side=3, **config)
        r["summary"]["block_steps_per_second"] = blocks
        return r

    rows = [row("jaxreg", 20.0, [1.0, 20.0, 30.0, 24.0], devices=1),
            row("jaxreg", 25.0, [1.0, 30.0, 24.0, 21.0], devices=2),
            row("icon_registration", 8.0, [0.5, 10.0, 6.0, 7.0], threads=2)]
    (record,) = amortized.compare(rows)
    # The fastest configurations (2 devices, 2 threads), turn by turn after the first: 3.0, 4.0, 3.0.
    assert record["steps_per_second_ratio_per_turn"] == pytest.approx({"median": 3.0, "min": 3.0, "max": 4.0, "turns": 3})
    assert amortized.per_turn(record) == "3.00× (3.00–4.00×, 3 turns)"
    # Runs made one after the other have no turns to compare.
    for r in rows:
        r["side_by_side"] = 1
    assert "steps_per_second_ratio_per_turn" not in amortized.compare(rows)[0]


def test_compare_keeps_the_3d_network_apart_from_the_mnist_one():
    def row_3d(tool, speed, **config):
        return dict(_row(tool, speed, None, **config), network=amortized.NETWORK_3D, loss="gradicon")

    rows = [_row("jaxreg", 25.0, None, devices=1), _row("icon_registration", 10.0, None, threads=2),
            row_3d("jaxreg", 3.0), row_3d("icon_registration", 4.0, threads=2), row_3d("icon_registration", 2.0, threads=1)]
    mnist, network_3d = amortized.compare(rows)
    assert mnist["network"] == "mnist-multistep" and mnist["steps_per_second_ratio"] == pytest.approx(2.5)
    assert network_3d["network"] == amortized.NETWORK_3D and network_3d["icon_threads"] == 2
    assert network_3d["steps_per_second_ratio"] == pytest.approx(0.75) and network_3d["meets_target"] is False
    assert [amortized.comparison_label(c) for c in (mnist, network_3d)] == ["diffusion", "gradicon, 3-D U-Net"]
    assert amortized.comparison_label({"loss": "icon"}) == "icon"  # files written before the 3-D peer name no network


def _copy_weights(torch, ours, theirs):
    """jaxreg UNet (nnx, kernels (k, k, k, in, out)) -> its torch copy (weights (out, in, k, k, k))."""
    import numpy as np

    pairs = [(ours.stem, theirs.stem), *zip(ours.down, theirs.down), *zip(ours.up, theirs.up), (ours.out, theirs.out)]
    for conv, layer in pairs:
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(conv.kernel[...]), (4, 3, 0, 1, 2))))
        layer.bias.data = torch.from_numpy(np.array(conv.bias[...]))


def test_icon_3d_peer_unet_computes_jaxregs_unet():
    """The peer's network is a copy of jaxreg's: with the same weights, the same displacements
    (stride-2 padding included), and the same number of parameters."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.peers import icon_3d
    from jaxreg.nn.modules import UNet

    features = (4, 8, 8)
    ours = UNet(3, features=features, rngs=nnx.Rngs(0))
    # The output layer starts at zero; give it weights so that every layer shows in the output.
    ours.out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1), ours.out.kernel.shape)
    theirs = icon_3d.make_unet(torch, ndim=3, features=features)
    assert sum(p.numel() for p in theirs.parameters()) == sum(np.size(p) for p in jax.tree_util.tree_leaves(nnx.state(ours, nnx.Param)))
    _copy_weights(torch, ours, theirs)
    pair = np.random.default_rng(0).standard_normal((16, 16, 16, 2)).astype(np.float32)
    with jax.default_matmul_precision("highest"):  # not TF32, where JAX runs on a GPU
        expected = np.asarray(ours(jnp.asarray(pair)))
    with torch.no_grad():
        got = theirs(torch.from_numpy(np.ascontiguousarray(pair.transpose(3, 0, 1, 2))[None]))[0].numpy().transpose(1, 2, 3, 0)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_icon_3d_peer_reads_icons_map_as_voxel_displacements():
    """icon's maps are points in [0, 1] per axis, channels first; the scoring takes voxels,
    channels last: a map shifted by (1, -2, 0.5) voxels reads back as that displacement."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from benchmarks.peers import icon_3d

    shape = (5, 6, 7)
    shift = np.array([1.0, -2.0, 0.5])
    identity = np.stack(np.meshgrid(*[np.arange(n) / (n - 1) for n in shape], indexing="ij"))[None]
    in_icon_units = torch.from_numpy((shift / (np.array(shape) - 1)).reshape(1, 3, 1, 1, 1))

    class Net:
        identity_map = torch.from_numpy(identity)

        @staticmethod
        def regis_net(moving, fixed):  # a map per pair, as icon's FunctionFromVectorField gives
            return lambda points: points + in_icon_units.expand(len(moving), 3, 1, 1, 1)

    field = icon_3d.icon_displacement(torch, Net, np.zeros((2, *shape)), np.zeros((2, *shape)))
    assert field.shape == (2, *shape, 3)
    np.testing.assert_allclose(field, np.broadcast_to(shift, field.shape), atol=1e-6)


def test_turn_length_is_what_the_runs_recorded_and_the_peers_mirror_the_examples():
    import importlib.util

    from benchmarks.peers import icon_mnist

    # The MNIST peer cannot import the jaxreg example (it would load JAX beside torch): it mirrors its BLOCK.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mnist_multistep.py")
    spec = importlib.util.spec_from_file_location("mnist_multistep", path)
    mnist_multistep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mnist_multistep)  # it puts examples/ on sys.path for its _common itself
    assert icon_mnist.BLOCK == mnist_multistep.BLOCK

    def row(network, block):
        return {"network": network, "summary": {} if block is None else {"block_steps": block}}

    result = {"rows": [row(amortized.NETWORK_3D, 10), row(amortized.NETWORK_3D, 10), row("mnist-multistep", None)],
              "comparisons": [{"network": amortized.NETWORK_3D, "loss": "gradicon"}, {"loss": "diffusion"}],
              "settings": {"side_by_side": True, "turns_3d": True}}
    assert amortized.block_steps(result, amortized.NETWORK_3D) == 10
    assert amortized.block_steps(result, "mnist-multistep") == 50  # files written before runs recorded it
    assert "MNIST every 50 training steps and the 3-D network every 10 training steps" in amortized.how_compared(result)
    result["rows"].append(row(amortized.NETWORK_3D, 25))
    with pytest.raises(ValueError, match="different lengths"):
        amortized.block_steps(result, amortized.NETWORK_3D)
