"""Benchmarks stay runnable: the GPU one skips cleanly on a CPU machine, the checkpoint-stall one runs --quick.

benchmarks/fsdp_memory.py --quick (about 25 s: two torchrun launches) is left out, like the other multi-process
benchmarks, to keep CI under its 20 minutes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_DIR, run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for minutes instead of skipping")
def test_gpu_benchmark_skips_cleanly_without_cuda():
    result = run_script(REPO_DIR / "benchmarks" / "gpu_throughput.py", ["--quick"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout + result.stderr


def test_async_checkpoint_benchmark_prints_its_table_in_quick_mode():
    result = run_script(REPO_DIR / "benchmarks" / "async_checkpoint.py", ["--quick"], timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]  # below the header
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [row[0] for row in rows] == ["DDP, rank-0 `torch.save` (today)", "DDP, `checkpoint.async_save=true`"] + [
        "FSDP, sharded DCP", "FSDP, sharded DCP, `checkpoint.async_save=true`"
    ]  # fmt: skip
    assert rows[0][2] == "1.00x" and all(float(row[1].replace(",", "")) > 0 for row in rows)
