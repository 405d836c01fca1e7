"""The population suite's ratios, its section of the results page, and the machine record."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import population, report  # noqa: E402


def test_speedup_is_the_ratio_of_median_times_and_the_spread_that_of_single_rounds():
    ratios = population.speedup_of_rounds([1.0, 2.0, 1.0], [2.0, 3.0, 1.5])
    # Medians 1.0 (vmap) and 2.0 (loop); the rounds' own ratios are 2.0, 1.5 and 1.5.
    assert ratios["speedup"] == pytest.approx(2.0)
    assert (ratios["speedup_min"], ratios["speedup_max"], ratios["rounds"]) == (pytest.approx(1.5), pytest.approx(2.0), 3)
    with pytest.raises(ValueError):
        population.speedup_of_rounds([1.0, 2.0], [1.0])


def _row(pairs, **extra):
    return {"stage": "svf", "pairs": pairs, "size": 96, "vmap_pairs_per_s": 2.0 * pairs, "loop_pairs_per_s": float(pairs),
            "speedup": 2.0, "vmap_compile_s": 3.0, "loop_compile_s": 0.1, **extra}


class _NoPlots:
    plt = None


def test_page_section_lists_the_per_round_spread_and_the_chunked_columns_in_order():
    result = {"settings": {"size": 96, "steps": 40, "rounds": 7, "batch_size": 32},
              "rows": [_row(8, speedup_min=1.25, speedup_max=1.75),
                       _row(128, speedup_min=1.5, speedup_max=2.5, chunked_pairs_per_s=300.0, chunked_speedup=2.34)]}
    lines = report.population_section(result, _NoPlots())
    table = [line for line in "\n".join(lines).splitlines() if line.startswith("| ")]
    assert table[0] == ("| stage | pairs | vmap pairs/s | loop pairs/s | vmap ÷ loop | per round | 32 at a time pairs/s | "
                        "32 at a time ÷ loop | vmap compile s | loop compile s |")
    assert table[1] == "| svf | 8 | 16.00 | 8.00 | 2.00 | 1.25–1.75 |  |  | 3.0 | 0.1 |"
    assert table[2] == "| svf | 128 | 256.00 | 128.00 | 2.00 | 1.50–2.50 | 300.00 | 2.34 | 3.0 | 0.1 |"
    # A results file written before the per-round columns existed renders without them.
    old = {"settings": {"size": 96, "steps": 40}, "rows": [_row(8)]}
    (header,) = [line for line in "\n".join(report.population_section(old, _NoPlots())).splitlines() if line.startswith("| stage")]
    assert "per round" not in header and header.endswith("| vmap compile s | loop compile s |")


def test_page_section_adds_the_sharded_columns_before_the_compile_times():
    result = {"settings": {"size": 96, "steps": 40, "rounds": 7, "batch_size": 32, "devices": 2},
              "rows": [_row(1, speedup_min=0.9, speedup_max=1.1),
                       _row(8, speedup_min=1.25, speedup_max=1.75, devices=2, sharded_pairs_per_s=14.0, sharded_speedup=1.75,
                            sharded_speedup_min=1.5, sharded_speedup_max=2.0),
                       _row(128, speedup_min=1.5, speedup_max=2.5, chunked_pairs_per_s=300.0, chunked_speedup=2.34, devices=2,
                            sharded_pairs_per_s=400.0, sharded_speedup=3.13, sharded_speedup_min=2.5, sharded_speedup_max=3.5,
                            sharded_batch_size=16, sharded_chunked_speedup=3.5)]}
    text = "\n".join(report.population_section(result, _NoPlots()))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| 32 at a time ÷ loop | sharded pairs/s | sharded ÷ loop | sharded per round | "
                             "sharded, 32 in flight ÷ loop | vmap compile s | loop compile s |")
    # One pair cannot be split over two devices: its sharded cells stay empty.
    assert table[1] == "| svf | 1 | 2.00 | 1.00 | 2.00 | 0.90–1.10 |  |  |  |  |  |  | 3.0 | 0.1 |"
    assert table[2] == "| svf | 8 | 16.00 | 8.00 | 2.00 | 1.25–1.75 |  |  | 14.00 | 1.75 | 1.50–2.00 |  | 3.0 | 0.1 |"
    assert table[3].endswith("| 300.00 | 2.34 | 400.00 | 3.13 | 2.50–3.50 | 3.50 | 3.0 | 0.1 |")
    assert "devices=2" in text and "xla_force_host_platform_device_count=2" in text and "`batch_size=16`" in text


def test_page_section_adds_the_library_columns_before_the_sharded_ones():
    result = {"settings": {"size": 96, "steps": 40, "rounds": 7, "batch_size": 32, "devices": 2, "cpu_chunk_voxels": 65536},
              "rows": [_row(8, speedup_min=1.25, speedup_max=1.75, library_pairs_per_s=17.0, library_speedup=2.13,
                            library_speedup_min=1.9, library_speedup_max=2.2, library_calls=2, library_threads=2,
                            devices=2, sharded_pairs_per_s=14.0, sharded_speedup=1.75, sharded_speedup_min=1.5,
                            sharded_speedup_max=2.0),
                       _row(1, speedup_min=0.9, speedup_max=1.1)]}
    text = "\n".join(report.population_section(result, _NoPlots()))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == ("| stage | pairs | vmap pairs/s | loop pairs/s | vmap ÷ loop | per round | register_many pairs/s | "
                        "register_many ÷ loop | its per round | calls on threads | sharded pairs/s | sharded ÷ loop | "
                        "sharded per round | vmap compile s | loop compile s |")
    assert table[1] == "| svf | 8 | 16.00 | 8.00 | 2.00 | 1.25–1.75 | 17.00 | 2.13 | 1.90–2.20 | 2 on 2 | 14.00 | 1.75 | 1.50–2.00 | 3.0 | 0.1 |"
    assert table[2] == "| svf | 1 | 2.00 | 1.00 | 2.00 | 0.90–1.10 |  |  |  |  |  |  |  | 3.0 | 0.1 |"
    assert "about 65,536 voxels of pairs (`jaxreg.population.CPU_CHUNK_VOXELS`)" in text


def test_host_device_count_is_read_from_the_command_line_before_jax_starts():
    assert population._host_devices_from(["--quick", "--host-devices", "3"]) == 3
    assert population._host_devices_from(["--host-devices=1"]) == 1
    assert population._host_devices_from(["--quick"]) == (os.cpu_count() or 1)


def test_cpu_description_reads_the_first_processor_and_its_widest_vector_isa():
    from benchmarks import _timing

    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
               "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n\nprocessor\t: 1\ncpu family\t: 25\nmodel name\t: other\n")
    described = _timing.cpu_description(cpuinfo)
    assert described == {"cpu_model": "AMD EPYC", "cpu_family": "26", "cpu_model_number": "2", "cpu_isa": "avx512f"}
    assert _timing.cpu_label(described) == "AMD EPYC (family 26 model 2, avx512f)"
    assert _timing.cpu_description(cpuinfo.replace(" avx512f avx512bw", ""))["cpu_isa"] == "avx2"
    # A record written before family and ISA were kept shows the name alone.
    assert _timing.cpu_label({"cpu_model": "AMD EPYC"}) == "AMD EPYC"


def test_a_full_run_measures_the_issues_counts_and_a_quick_one_does_not():
    from benchmarks import run

    full = run.suite_command("population", "/tmp/out", quick=False, peer_python=None)
    quick = run.suite_command("population", "/tmp/out", quick=True, peer_python=None)
    assert "--large" in full and "--quick" not in full
    assert "--large" not in quick and "--quick" in quick
    # Only the population suite takes --large.
    assert "--large" not in run.suite_command("kernels", "/tmp/out", quick=False, peer_python=None)
