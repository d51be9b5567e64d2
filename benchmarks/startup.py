"""Start-up: seconds from the command to the first training step, and what ddp-trainer imports on the way and why.

Run: python benchmarks/startup.py [--quick] [--repeats 3]
The first step is stamped by a forward pre-hook on the model (every variant builds it through
workloads.build_model), so it is the same instant in every variant: the first forward of the first step.
The imports come from `python -X importtime` of the default recipe, with benchmarks/import_probe.py naming the
line that first asked for each package.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    BENCHMARKS_DIR,
    REPO_ROOT,
    Report,
    add_common_arguments,
    bench_env,
    markdown_table,
    median,
    repeats_for,
    spread,
)
from variants import LABELS, RunResult, available_variants, measure, select
from workloads import TINY_MLP

WORLD_SIZES = (1, 2)
TOP_IMPORTS = 8
# The optional loggers: each must be imported only when its config key turns it on.
LOGGER_CASES = {
    "default (loggers off)": [],
    "logging.tensorboard=true": ["logging.tensorboard=true"],
    "logging.wandb.mode=offline": ["logging.wandb.mode=offline"],
}
OPTIONAL_PACKAGES = ("tensorboard", "wandb", "torchvision", "sklearn", "matplotlib", "lightning")


def startup_report(results: list[RunResult]) -> Report:
    """Median seconds to the first step per variant, 1 process and 2-rank torchrun, and the ratio to (a)."""
    rows = []
    for variant in [v for v in LABELS if any(r.variant == v for r in results)]:
        row = [LABELS[variant]]
        for world_size in WORLD_SIZES:
            seconds = [r.first_step_s for r in select(results, variant, TINY_MLP.key, world_size)]
            baseline = median([r.first_step_s for r in select(results, "torch", TINY_MLP.key, world_size)])
            row += [f"{median(seconds):.2f}", spread(seconds), f"{median(seconds) / baseline:.2f}"]
        rows.append(row)
    headers = ["variant", "1 process (s)", "spread", "vs (a)", "torchrun, 2 ranks (s)", "spread", "vs (a)"]
    repeats = len(select(results, "torch", TINY_MLP.key, 1))
    body = (
        f"{markdown_table(headers, rows)}\n\n"
        f"Wall time from starting the command (`python ...`, or `python -m torch.distributed.run --standalone "
        f"--nproc-per-node=2 ...`) to the first forward of the first training step ({TINY_MLP.title}; for 2 "
        f"ranks, the later rank), median of {repeats} run(s). Includes interpreter start, imports, building data "
        "and model, process-group set-up and DDP's initial broadcast.\n"
    )
    return Report("Start-up (seconds to the first training step)", body)


def parse_importtime(stderr: str) -> dict[str, float]:
    """Cumulative milliseconds per module from `-X importtime` lines (the first, outermost load of each)."""
    cumulative = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, total_us, name = line[len("import time:") :].split("|")
        cumulative.setdefault(name.strip(), int(total_us) / 1000)
    return cumulative


def trace_imports(overrides: list[str], folder: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Run the default recipe for one step under -X importtime and the import probe; (ms per module, importers)."""
    importers_file = folder / "importers.json"
    output_dir = folder / "run"
    command = [sys.executable, "-X", "importtime", str(BENCHMARKS_DIR / "import_probe.py"), str(importers_file)]
    command += ["--config", "configs/digits_mlp.yaml", "trainer.max_steps=1", "trainer.epochs=1", "trainer.resume=none"]
    command += ["trainer.device=cpu", f"output_dir={output_dir}", *overrides]
    env = bench_env()
    env["WANDB_DIR"] = str(folder)  # wandb keeps its files out of the repository whatever the logger does
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"import trace failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return parse_importtime(result.stderr), json.loads(importers_file.read_text())


def import_report() -> Report:
    """The heaviest imports of a default run and who asked for them; which optional loggers each config imports."""
    with tempfile.TemporaryDirectory(prefix="ddp-bench-imports-") as temporary:
        traces = {}
        for case, overrides in LOGGER_CASES.items():
            folder = Path(temporary) / str(len(traces))
            folder.mkdir()
            traces[case] = trace_imports(overrides, folder)
    cumulative, importers = traces["default (loggers off)"]
    heaviest = sorted(importers, key=lambda name: -cumulative.get(name, 0.0))[:TOP_IMPORTS]
    rows = [[f"`{name}`", f"{cumulative.get(name, 0.0):,.0f}", importers[name]] for name in heaviest]
    heavy_table = markdown_table(["package", "import ms (cumulative)", "first imported by"], rows)
    logger_rows = [
        [case, *("yes" if package in trace[1] else "no" for package in OPTIONAL_PACKAGES)]
        for case, trace in traces.items()
    ]
    logger_table = markdown_table(
        ["`ddp-train --config configs/digits_mlp.yaml` with", *OPTIONAL_PACKAGES], logger_rows
    )
    body = (
        f"{heavy_table}\n\nThe {TOP_IMPORTS} heaviest packages a one-step run of the default recipe imports "
        "(`python -X importtime`, one run; times include the tracing overhead and vary by about 20%). "
        "`first imported by` is the line that asked for the package first (`via` names the ddp_trainer line that led "
        f"there).\n\nOptional packages imported at all:\n\n{logger_table}\n"
    )
    return Report("What start-up imports, and why", body)


def run(repeats: int) -> list[Report]:
    """Time the first step of every variant and trace ddp-trainer's imports."""
    variants, _ = available_variants()
    results = measure([TINY_MLP], variants, WORLD_SIZES, repeats, epochs=2, size_factor=0.25)
    return [startup_report(results), import_report()]


def main() -> None:
    """Parse the flags, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    for report in run(repeats_for(args.quick, args.repeats)):
        print(report.markdown())


if __name__ == "__main__":
    main()
