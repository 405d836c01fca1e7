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
