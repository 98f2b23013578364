"""benchmarks/gpu_check.sh in its real (GPU) mode on a machine without a GPU: every cuda
step fails, each failure is recorded, the run goes on and exits 1. Apart from
tests/test_gpu_check.py (the dry run) so that each file stays well under 90 s."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_the_real_run_records_each_failure_and_goes_on(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the failure path without one")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:]
    steps = [line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines()[1:]]
    # The sweep stops at its first failure; every later step still gets its line.
    assert steps == [["equivalence", "PASS"], ["sweep_bf16_b64", "FAIL"], ["generate", "FAIL"],
                     ["quickstart", "FAIL"], ["fp32", "FAIL"], ["compiled", "FAIL"]]
    assert "backend 'cuda' is unavailable" in (tmp_path / "logs" / "sweep_bf16_b64.log").read_text()
    rows = {r["figure"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows["cuda equivalence tests vs cpu"]["result"] == "FAIL"  # every test skipped: needs CUDA
    assert rows["L16 bf16 training, samples/s"]["result"] == "FAIL"
    assert "a step FAILED (exit status 1)" in proc.stdout
