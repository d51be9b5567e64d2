"""The benchmark scripts stay runnable: the GPU one skips cleanly on a CPU machine, the async one runs --quick."""

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
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and "`checkpoint.async_save=true`" in rows[2]
