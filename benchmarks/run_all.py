"""Run every benchmark in sequence, print all tables and write them to benchmarks/RESULTS.md.

Run: python benchmarks/run_all.py [--quick] [--repeats 3]
About 13 minutes on 2 CPU cores with Lightning and Accelerate installed, 8 without (about 2.5 with --quick). The
scaling and start-up tables reuse the overhead runs: the same launches, read for per-rank throughput and for the time
to the first step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import checkpoint_cost
import gpu_throughput
import overhead
import scaling
import startup
import step_ops
from common import BENCHMARKS_DIR, Report, add_common_arguments, machine_description, repeats_for
from workloads import SMALL_CNN, TINY_MLP


def load_average() -> str:
    """The 1-minute load average: how busy the machine was besides the benchmark."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def results_markdown(reports: list[Report], command: str, seconds: float, loads: tuple[str, str]) -> str:
    """RESULTS.md: the command, the machine, how busy it was, then every table."""
    header = (
        "# Benchmark results\n\n"
        f"`{command}` on {datetime.date.today().isoformat()}, {seconds / 60:.1f} minutes.\n\n"
        f"Machine: {machine_description()}.\n\n"
        f"Load average (1 min) at the start: {loads[0]}, at the end: {loads[1]}. With other work on the same cores "
        "the figures move by 10-30% between runs; compare ratios measured in the same run, not absolute figures "
        "across runs.\n"
    )
    return "\n".join([header, *(report.markdown() for report in reports)])


def main() -> None:
    """Run the benchmarks one after the other, printing each table as it is ready; write RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    repeats = repeats_for(args.quick, args.repeats)
    started, start_load = time.perf_counter(), load_average()
    reports: list[Report] = []

    def publish(report: Report) -> None:
        reports.append(report)
        print(report.markdown(), flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)

    overhead_report, results = overhead.run(args.quick, repeats)
    publish(overhead_report)
    publish(scaling.scaling_report(results, [TINY_MLP, SMALL_CNN]))
    publish(startup.startup_report(results))
    publish(startup.import_report())
    publish(checkpoint_cost.run(repeats))
    step_settings = gpu_throughput.Settings("cpu", batch_size=16, steps=50)
    publish(step_ops.run("mlp", "bf16 + channels_last", step_settings, timed_epochs=5 if args.quick else 20, workers=0))
    publish(gpu_throughput.run(gpu_throughput.Settings(), repeats))
    command = " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    elapsed = time.perf_counter() - started
    markdown = results_markdown(reports, command, elapsed, (start_load, load_average()))
    (BENCHMARKS_DIR / "RESULTS.md").write_text(markdown)
    print(f"all benchmarks took {elapsed / 60:.1f} minutes; tables written to benchmarks/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
