"""benchmarks/gpu_check.sh: its --dry-run (every step on the cpu backend at tiny sizes) and
the summary's judging of the targets (benchmarks/gpu_check_report.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check_report  # noqa: E402

FIGURES = [
    "GPU (nvidia-smi: name, driver, memory)", "torch", "cuda equivalence tests vs cpu",
    "L16 bf16 training, samples/s", "L16 bf16 MFU vs measured bf16 matmul peak",
    "L16 fp32 training, samples/s", "one L16 image, cached, seconds",
    "4 L16 images together, images/s", "quickstart on cpu: fidelity, seen combinations",
    "quickstart on cpu: fidelity, withheld combinations",
]
STEPS = ["equivalence", "sweep_bf16_b1", "generate", "quickstart", "fp32", "compiled"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out, proc


def test_dry_run_runs_every_step_and_prints_the_table(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("| figure"):]
    for figure in FIGURES:
        assert f"| {figure} " in table, figure
    for step in STEPS:
        assert f"| step {step} " in table, step
    rows = {r["figure"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert not [f for f, r in rows.items() if r["result"] == "FAIL"]
    # A dry run does not judge the targets, but shows them.
    assert rows["L16 bf16 training, samples/s"]["target"] == ">= 2000"
    assert rows["L16 bf16 training, samples/s"]["result"] == "ok (dry run)"
    assert "needs CUDA" in rows["cuda equivalence tests vs cpu"]["value"]
    assert rows["one L16 image, cached, seconds"]["target"] == "<= 0.5"
    assert "% of" in rows["L16 bf16 MFU vs measured bf16 matmul peak"]["value"]
    assert "gpu_check: every step ran (exit status 0)" in proc.stdout


def test_dry_run_folder_holds_logs_jsons_and_summary(dry_run):
    out, _ = dry_run
    for name in ["env.txt", "steps.tsv", "equivalence.xml", "gpu_check.log", "summary.md",
                 "summary.json", "summary.txt", "sweep/bf16_b1.json", "sweep/best_batch.txt",
                 "generate.json", "fp32.json", "compiled.json", "quickstart/metrics.json",
                 "quickstart/samples.png"]:
        assert (out / name).is_file(), name
    for step in STEPS:
        assert (out / "logs" / f"{step}.log").stat().st_size > 0, step
    steps = (out / "steps.tsv").read_text().splitlines()
    assert steps[0] == "step\tstatus\trc\tseconds"
    assert all(line.split("\t")[1] == "PASS" for line in steps[1:]), steps
    first = json.loads((out / "sweep" / "bf16_b1.json").read_text())
    assert first["precision"] == "bf16" and first["batch_size"] == 1 and first["matmul_peak_bf16"] > 0
    gen = json.loads((out / "generate.json").read_text())["generate"]
    assert gen["images_together"] == 4 and gen["cached_bf16_s"] > 0
    assert json.loads((out / "fp32.json").read_text())["precision"] == "fp32"
    assert "mode: dry run (cpu)" in (out / "env.txt").read_text()


def _fake_out(tmp_path, *, sps=2500.0, cached=0.3, rate=150.0, seen=1.0, withheld=0.9,
              failures=0, step_status="PASS"):
    """A folder as gpu_check.sh writes it on a GPU, with the given figures."""
    (tmp_path / "sweep").mkdir()
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "env.txt").write_text("mode: gpu\ngpu: NVIDIA H200, 570.00, 143771 MiB\n"
                                      "torch: 2.14.1 CUDA 13.0 available True\n")
    cases = "".join(f'<testcase name="t{i}"/>' for i in range(6))
    cases += "".join(f'<testcase name="f{i}"><failure message="x"/></testcase>' for i in range(failures))
    cases += '<testcase name="nccl"><skipped message="needs CUDA with 2 GPUs (NCCL)"/></testcase>'
    (tmp_path / "equivalence.xml").write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    flops = 150e9
    (tmp_path / "sweep" / "bf16_b64.json").write_text(json.dumps(
        {"batch_size": 64, "samples_per_sec": sps / 2, "flops_per_sample": flops,
         "matmul_peak_bf16": 750e12, "matmul_peak_fp32": 50e12}))
    (tmp_path / "sweep" / "bf16_b128.json").write_text(json.dumps(
        {"batch_size": 128, "samples_per_sec": sps, "flops_per_sample": flops}))
    (tmp_path / "compiled.json").write_text(json.dumps(
        {"batch_size": 128, "samples_per_sec": sps * 0.9, "flops_per_sample": flops}))
    (tmp_path / "fp32.json").write_text(json.dumps(
        {"batch_size": 64, "samples_per_sec": 300.0, "flops_per_sample": flops}))
    (tmp_path / "generate.json").write_text(json.dumps({"generate": {
        "cached_fp32_s": cached * 1.5, "cached_bf16_s": cached, "images_together": 64,
        "images_per_sec_fp32": rate / 2, "images_per_sec_bf16": rate, "cuda_graphs": True}}))
    (tmp_path / "quickstart" / "metrics.json").write_text(json.dumps({"fidelity": {
        "seen": {"accuracy": seen, "images": 64}, "withheld": {"accuracy": withheld, "images": 64}}}))
    steps = ["equivalence", "sweep_bf16_b64", "sweep_bf16_b128", "generate", "quickstart", "fp32", "compiled"]
    (tmp_path / "steps.tsv").write_text("step\tstatus\trc\tseconds\n" + "".join(
        f"{s}\t{step_status if s == 'compiled' else 'PASS'}\t0\t10\n" for s in steps))
    return tmp_path


def _rows(out):
    return {r["figure"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}


def test_report_passes_when_every_target_is_met(tmp_path, capsys):
    out = _fake_out(tmp_path)
    assert gpu_check_report.main([str(out)]) == 0
    rows = _rows(out)
    best = rows["L16 bf16 training, samples/s"]
    assert best["result"] == "PASS" and best["value"] == "2500.0 (batch 128, eager)"
    # MFU: 2500 samples/s x 150 GFLOP against the 750 TFLOP/s measured peak = 50%
    assert rows["L16 bf16 MFU vs measured bf16 matmul peak"]["value"].startswith("50.0% of 750.0 TFLOP/s")
    assert rows["one L16 image, cached, seconds"]["value"] == "0.300 (bf16 weights (CUDA graphs))"
    assert rows["64 L16 images together, images/s"]["result"] == "PASS"
    assert rows["cuda equivalence tests vs cpu"]["result"] == "PASS"  # the 2-GPU skip is not 'needs CUDA'
    assert "every target was met" in capsys.readouterr().out


@pytest.mark.parametrize("figures, figure", [
    (dict(sps=1900.0), "L16 bf16 training, samples/s"),
    (dict(cached=0.7), "one L16 image, cached, seconds"),
    (dict(rate=90.0), "64 L16 images together, images/s"),
    (dict(withheld=0.5), "quickstart on cuda: fidelity, withheld combinations"),
])
def test_report_marks_a_missed_target_and_exits_3(tmp_path, figures, figure):
    out = _fake_out(tmp_path, **figures)
    assert gpu_check_report.main([str(out)]) == 3
    assert [f for f, r in _rows(out).items() if r["result"] == "MISSED"] == [figure]


def test_report_fails_on_a_failed_step_or_test_and_exits_1(tmp_path):
    for name in "abc":
        (tmp_path / name).mkdir()
    out = _fake_out(tmp_path / "a", failures=1)
    assert gpu_check_report.main([str(out)]) == 1
    assert _rows(out)["cuda equivalence tests vs cpu"]["result"] == "FAIL"
    out = _fake_out(tmp_path / "b", step_status="TIMEOUT")
    assert gpu_check_report.main([str(out)]) == 1
    assert _rows(out)["step compiled"]["result"] == "FAIL"
    # Nothing written at all: every figure is a FAIL.
    assert gpu_check_report.main([str(tmp_path / "c")]) == 1
    assert _rows(tmp_path / "c")["L16 bf16 training, samples/s"]["result"] == "FAIL"


def test_script_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--frobnicate"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr
