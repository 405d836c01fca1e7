"""The kernels suite's runner: rounds that call every implementation in turn."""

import numpy as np

from benchmarks import kernels
from benchmarks._timing import time_in_rounds


def test_time_in_rounds_calls_each_once_per_round_in_turn_starting_one_later_each_round():
    log = []
    calls = [lambda: log.append("a"), lambda: log.append("b"), lambda: log.append("c")]
    times = time_in_rounds(calls, 4)
    assert log == list("abc" "bca" "cab" "abc")  # nobody always follows the same neighbour
    assert [len(t) for t in times] == [4, 4, 4]
    assert all(s >= 0.0 for t in times for s in t)
    log.clear()
    time_in_rounds(calls, 2, rotate=False)
    assert log == list("abcabc")


def test_run_case_rows_give_peer_over_jaxreg_and_differences_against_jaxreg():
    x = np.linspace(0.0, 1.0, 64, dtype=np.float32)

    def failing():
        raise RuntimeError("peer broke\nsecond line")

    def skipped():
        raise kernels.Skip("not here")

    impls = [
        ("jaxreg", lambda: kernels.jax_case(lambda v: v * 2.0, x)),
        ("numpy", lambda: ("eager", lambda: x * 2.0 + 1e-3, (), np.asarray)),
        ("broken", failing),
        ("absent", skipped),
    ]
    rows = kernels.run_case("double", (64,), 5, x.nbytes * 2, impls)
    ours, theirs, broken, absent = rows
    assert [r["impl"] for r in rows] == ["jaxreg", "numpy", "broken", "absent"]
    assert ours["n"] == theirs["n"] >= 5 and len(ours["times_s"]) == ours["n"]
    assert theirs["ratio"] == theirs["median_s"] / ours["median_s"]
    # max |peer - jaxreg| / max |jaxreg| = 1e-3 / 2
    np.testing.assert_allclose(theirs["max_rel_diff"], 5e-4, rtol=1e-3)
    assert ours["compile_s"] > 0 and "ratio" not in ours
    assert broken["note"] == "error: RuntimeError: peer broke" and "median_s" not in broken
    assert absent["note"] == "skipped: not here"


def test_dispatch_text_states_both_modes_in_milliseconds_and_nothing_without_both():
    from benchmarks._timing import dispatch_text

    measured = {"method": "m", "async": {"empty_s": 7e-6, "warp_64_s": 8.8e-5}, "sync": {"empty_s": 6e-6, "warp_64_s": 1.3e-5}}
    text = dispatch_text(measured)
    assert "0.007 ms" in text and "0.006 ms" in text and "0.088 ms and 0.013 ms" in text
    assert dispatch_text(None) is None
    assert dispatch_text({**measured, "sync": {"error": "TimeoutExpired"}}) is None


def test_a_run_with_retained_host_memory_says_so_in_its_results_page_and_only_then():
    from benchmarks import report

    class NoPlots:
        plt = None

    row = dict(kernel="svf exp", size="8×8×8", impl="jaxreg", median_s=0.01)
    text = lambda settings: "\n".join(report.kernels_section(dict(rows=[row], settings=settings), NoPlots()))  # noqa: E731
    assert "Allocator: `jaxreg.retain_host_memory()`" in text({"retain_host_memory": True})
    assert "Allocator" not in text({"retain_host_memory": False})
    assert "Allocator" not in text({})
