"""Programs taking turns on the machine (benchmarks/_turns.py): one computes at a time, round and round."""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._paths import REPO, repo_env  # noqa: E402
from benchmarks._turns import run_in_turn  # noqa: E402

# Each block: note the time, busy-wait a little (so that overlapping blocks would show),
# note the time again. After the blocks, one last turn for the "evaluation".
CHILD = """
import json, sys, time
from benchmarks._turns import Turn
turn = Turn.from_environment()
out, blocks = sys.argv[1], int(sys.argv[2])
spans = []
for _ in range(blocks):
    turn()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.05:
        pass
    spans.append([t0, time.monotonic()])
turn()
t0 = time.monotonic()
spans.append([t0, time.monotonic() + 0.02])
time.sleep(0.02)
json.dump(spans, open(out, "w"))
"""


def _job(tmp_path, name, *args, code=CHILD):
    return [sys.executable, "-c", code, str(tmp_path / f"{name}.json"), *map(str, args)], str(tmp_path / f"{name}.log"), repo_env()


def test_children_compute_one_at_a_time_round_and_round(tmp_path):
    outcomes = run_in_turn([_job(tmp_path, "a", 3), _job(tmp_path, "b", 2)], timeout=120, cwd=REPO)
    assert [o["returncode"] for o in outcomes] == [0, 0], [open(tmp_path / f"{n}.log").read() for n in "ab"]
    spans = {n: json.load(open(tmp_path / f"{n}.json")) for n in "ab"}
    events = sorted([(start, end, name) for name, s in spans.items() for start, end in s])
    # No two blocks overlap, and the turns alternate while both are still running:
    # a's 3 blocks and its evaluation, b's 2 and its evaluation.
    for (_, end, _), (start, _, _) in zip(events, events[1:]):
        assert end <= start
    assert [name for _, _, name in events] == ["a", "b", "a", "b", "a", "b", "a"]
    assert [o["turns"] for o in outcomes] == [4, 3]


def test_a_child_without_turns_runs_alone_and_a_stuck_one_is_killed(tmp_path):
    free = [sys.executable, "-c", "import time; time.sleep(0.2)"], str(tmp_path / "free.log"), repo_env()
    stuck = [sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "stuck.log"), repo_env()
    started = time.monotonic()
    outcomes = run_in_turn([free, stuck], timeout=3, cwd=REPO)
    assert time.monotonic() - started < 30
    assert outcomes[0] == {"returncode": 0, "timed_out": False, "turns": 1}
    assert outcomes[1]["timed_out"] and outcomes[1]["returncode"] == -9
