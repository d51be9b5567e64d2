"""DDP weak scaling on CPU: per-rank throughput at 1 and 2 ranks, ddp-trainer against the bare DDP loop.

Run: python benchmarks/scaling.py [--quick] [--repeats 3]
One thread per rank, a fixed per-rank batch, gloo. Efficiency = throughput(2) / (2 x throughput(1)), where
throughput is samples/s summed over ranks; 1.0 would be perfect scaling.
"""

from __future__ import annotations

import argparse

from common import Report, add_common_arguments, markdown_table, repeats_for
from variants import LABELS, RunResult, measure, median_rate, run_length
from workloads import SMALL_CNN, TINY_MLP, Workload

VARIANTS = ("torch", "ddp-trainer")
TARGET = 0.95  # ddp-trainer's efficiency should be at least 95% of the bare loop's


def efficiency(results: list[RunResult], variant: str, workload: Workload) -> tuple[float, float, float]:
    """(samples/s of one rank at 1 rank, the same at 2 ranks, weak-scaling efficiency)."""
    one, two = (workload.batch_size * median_rate(results, variant, workload.key, world_size) for world_size in (1, 2))
    return one, two, two / one  # (2 ranks x two) / (2 x one): the summed throughput over twice the single rank's


def scaling_report(results: list[RunResult], workloads: list[Workload]) -> Report:
    """Per-rank samples/s at 1 and 2 ranks, efficiency, and ddp-trainer's efficiency relative to the bare loop's."""
    rows, verdicts = [], []
    for workload in workloads:
        baseline = efficiency(results, "torch", workload)[2]
        for variant in VARIANTS:
            one, two, value = efficiency(results, variant, workload)
            rows.append(
                [workload.key, LABELS[variant], f"{one:,.0f}", f"{two:,.0f}", f"{value:.2f}", f"{value / baseline:.2f}"]
            )
        relative = efficiency(results, "ddp-trainer", workload)[2] / baseline
        verdicts.append(
            f"- {workload.key}: {relative:.2f} of the bare loop's, {'met' if relative >= TARGET else 'missed'}."
        )
    headers = ["workload", "variant", "samples/s per rank, 1 rank", "samples/s per rank, 2 ranks", "efficiency"]
    body = (
        f"{markdown_table([*headers, 'vs (a)'], rows)}\n\n"
        "Weak scaling: the per-rank batch stays fixed, so 2 ranks train twice the samples per step. "
        "Efficiency = throughput(2) / (2 x throughput(1)) with throughput summed over ranks. "
        f"Target: ddp-trainer's efficiency at least {TARGET:.0%} of the bare DDP loop's (`vs (a)` >= {TARGET}). "
        "Same runs as the overhead table when run by run_all.py. On a 2-core machine both ranks share the only "
        "2 cores with the launcher and the OS, so neither loop reaches 1.0.\n\n" + "\n".join(verdicts) + "\n"
    )
    return Report("DDP weak scaling on CPU (gloo, 1 thread per rank)", body)


def main() -> None:
    """Parse the flags, measure the bare loop and ddp-trainer at 1 and 2 ranks, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    workloads = [TINY_MLP, SMALL_CNN]
    epochs, size_factor = run_length(args.quick)
    results = measure(workloads, list(VARIANTS), (1, 2), repeats_for(args.quick, args.repeats), epochs, size_factor)
    print(scaling_report(results, workloads).markdown())


if __name__ == "__main__":
    main()
