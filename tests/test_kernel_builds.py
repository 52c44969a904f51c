"""Tests of `kernels.py --compile-report`: the GPU builds of the kernels, checked without a GPU.

Triton compiles for any NVIDIA architecture on a CPU-only Linux machine (its wheel carries ptxas),
so the tile tables that only a GPU would run can still be held to two things the interpreter tests
cannot see: no kernel spills registers, and none asks for more shared memory than the GPU has.
The report's own pieces (_specialise, record_launches) are tested in test_kernels.py.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# The test process has Triton in interpreter mode (conftest.py); compiling for a GPU needs a process
# without it, so the report runs in a subprocess.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def compile_report(capability: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "kernels.py"), "--compile-report", str(capability)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_triton
def test_h100_builds_fit_and_use_wgmma():
    """sm_90: no spills except the one timed on an H200 and kept, shared memory within 227 KiB, and
    every 16-bit matmul kernel on wgmma (Hopper's tensor-core instruction; mma.sync is the older,
    slower path there), except decoding, whose 16-row query block is below wgmma's 64 rows."""
    report = compile_report(90)
    rows = [line for line in report.splitlines() if line.startswith("_")]
    assert len(rows) >= 20, report
    assert "does not fit" not in report, report
    for row in rows:
        if " bf16 " in row and not row.startswith("_attn_bwd_delta_kernel") and "Tq=1" not in row:
            assert row.split("|")[1].split()[3] == "wgmma", row
    kept = [row for row in rows if "timed on a GPU and kept" in row]
    assert [row.split()[0] for row in kept] == ["_attn_bwd_dkdv_kernel"], report  # the grouped build only


@needs_triton
def test_rtx4090_builds_fit():
    """sm_89 has 99 KiB of shared memory per block, the least of the GPUs a course would use."""
    report = compile_report(89)
    assert "does not fit" not in report, report
