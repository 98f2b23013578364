"""The ``cuda`` backend against the ``cpu`` reference on the ``unit_test`` recipe.

Runs wherever a GPU is present (each test skips with "needs CUDA" otherwise; the NCCL test
needs two). fp32 with TF32 off must follow the CPU losses step by step (axial layers through the
masked fused attention and through the per-line path; the fused and the foreach
optimizer); bf16 and fp16 are compared with the tolerances their 8 and 11 mantissa bits
allow, and fp16's dynamic loss scaling must skip (and count) an overflowing update without
touching the weights. The speed options: the torch.compile'd model against the CPU, the
CUDA-graph decoding step against the eager cached steps, and `minidalle bench --backend
cuda --generate` end to end.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidalle.testing.backend import check_backend, fixed_batch, unit_test_config

STEPS = 10
# As in test_backends.py: the recipe's model and training numbers, small vocabularies.
SIZES = dict(text_vocab=256, num_image_tokens=64, fmap_size=8)
ROOT = Path(__file__).resolve().parents[2]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda(**params):
    from minidalle.plugin.discovery import get_registry

    return lambda: get_registry().build("backend", "cuda", dict(params))


def _cpu(**params):
    from minidalle.plugin.discovery import get_registry

    return lambda: get_registry().build("backend", "cpu", dict(params))


@needs_cuda
@pytest.mark.parametrize("axial_sdpa", [True, False])
def test_fp32_follows_the_cpu_reference(axial_sdpa):
    report = check_backend(_cuda(precision="fp32", tf32=False, axial_sdpa=axial_sdpa), steps=STEPS,
                           atol=1e-5, weights_atol=1e-4, sizes=SIZES)
    assert report["reference"][-1] < report["reference"][0]  # it trains


@needs_cuda
def test_fp32_with_the_foreach_optimizer_follows_the_cpu_reference():
    check_backend(_cuda(precision="fp32", fused_optimizer=False), steps=STEPS, atol=1e-5,
                  weights_atol=1e-4, sizes=SIZES)


@needs_cuda
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_compiled_model_follows_the_cpu_reference(precision, atol):
    """backend.compile: torch.compile (inductor) reorders and fuses float operations."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16 support")
    check_backend(_cuda(precision=precision, compile=True), make_reference=_cpu(precision=precision),
                  steps=STEPS, atol=atol, sizes=SIZES)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_matches_eager_cached_decoding(dtype):
    """The replayed graph against the ordinary cached steps on the same GPU model."""
    from minidalle.inference import graph_decode
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry
    from minidalle.inference.sampling import generate_image_codes

    cfg = unit_test_config(model={"depth": 4, "attn_types": ["axial_row", "axial_col", "conv_like", "full"]})
    torch.manual_seed(0)
    model = build_model(cfg, registry=get_registry(), **SIZES).to("cuda", dtype).eval()
    text = torch.randint(1, SIZES["text_vocab"], (4, cfg.model.text_seq_len), device="cuda")
    for n in (1, 4):
        eager, graph = [], []
        a = generate_image_codes(model, text[:n], seed=0, filter_thres=0.9,
                                 on_logits=lambda s, x: eager.append(x))
        b = generate_image_codes(model, text[:n], seed=0, filter_thres=0.9, cuda_graph=True,
                                 on_logits=lambda s, x: graph.append(x))
        assert graph_decode._steps[model][(n, True)].graph is not None
        tol = 1e-4 if dtype == torch.float32 else 1e-1  # bf16: two kernels, two roundings
        worst = max(float((x - y).abs().max()) for x, y in zip(eager, graph))
        assert worst <= tol, f"logits differ by up to {worst:g}"
        if dtype == torch.float32:
            assert torch.equal(a, b)


@needs_cuda
def test_bench_on_cuda_measures_the_peak_memory_and_sampling(tmp_path):
    """`minidalle bench --backend cuda --generate` end to end (tiny sizes)."""
    import json

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "minidalle", "bench", str(ROOT / "configs" / "unit_test.toml"),
         "--backend", "cuda", "--precision", "bf16", "--batch-size", "4", "--steps", "2",
         "--warmup", "1", "--peak-sizes", "1024", "--generate", "--generate-images", "4",
         "--no-uncached", "--set", "bench.fmap_size=8", "--set", "bench.text_vocab=256",
         "--set", "bench.num_image_tokens=64", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"].startswith("cuda") and r["cuda_max_allocated_bytes"] > 0
    assert r["matmul_peak_bf16"] > r["matmul_peak_fp32"] > 0 and 0 < r["mfu"] < 1
    assert r["generate"]["cuda_graphs"] and r["generate"]["images_per_sec_bf16"] > 0


@needs_cuda
def test_bf16_autocast_stays_close_to_the_cpu_bf16_reference():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16 support")
    check_backend(_cuda(precision="bf16"), make_reference=_cpu(precision="bf16"), steps=STEPS,
                  atol=5e-2, sizes=SIZES)


@needs_cuda
def test_fp16_with_dynamic_loss_scaling_stays_close_to_fp32():
    report = check_backend(_cuda(precision="fp16"), steps=STEPS, atol=5e-2, sizes=SIZES)
    assert report["backend"][-1] < report["backend"][0]


def _one_step(backend, cfg):
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry

    torch.manual_seed(cfg.run.seed)
    model = backend.setup_model(build_model(cfg, registry=get_registry(), **SIZES))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = backend.build_optimizer(model, cfg.training)
    runner = backend.prepare(model, optimizer, cfg.training)
    result = runner.train_step(fixed_batch(cfg, **SIZES))
    runner.sync_to_host()
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    return runner, result, changed


@needs_cuda
def test_fp16_overflow_skips_the_update_counts_it_and_lowers_the_scale():
    cfg = unit_test_config(training={"loss_scaling": 2.0**40})  # the first scale: overflows fp16
    runner, result, changed = _one_step(_cuda(precision="fp16")(), cfg)
    assert result.skipped_updates == 1
    assert not changed
    assert result.extra["loss_scale"] == 2.0**39
    # The scaler state goes into checkpoints (plain numbers) and comes back.
    state = runner.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**39
    other = _one_step(_cuda(precision="fp16")(), unit_test_config())[0]
    other.load_state_dict(copy.deepcopy(state))
    assert other.scaler.get_scale() == 2.0**39


@needs_cuda
def test_fp16_normal_step_is_not_skipped():
    runner, result, changed = _one_step(_cuda(precision="fp16")(), unit_test_config())
    assert result.skipped_updates == 0 and changed


@needs_cuda
def test_rng_state_round_trips():
    backend = _cuda()()
    backend.seed(3)
    state = backend.rng_state()
    a = torch.rand(4, device=backend.device)
    backend.set_rng_state(state)
    assert torch.equal(a, torch.rand(4, device=backend.device))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs CUDA with 2 GPUs (NCCL)")
def test_two_gpus_with_nccl_match_one_gpu_with_twice_the_batch(tmp_path):
    """`minidalle run --nproc 2` on two GPUs (NCCL) vs one GPU with a twice larger batch."""
    from safetensors.torch import load_file

    site = tmp_path / "site"
    info = site / "minidalle_cuda_test-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: minidalle-cuda-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[minidalle]\ntiny = _tiny:Plugin\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "tests")])
    env["MINIDALLE_PLUGINS"] = "tiny"

    def run(name, batch, *extra):
        out = tmp_path / name
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text("\n".join([
            f'extends = "{ROOT / "configs" / "unit_test.toml"}"',
            f'[run]\nout_dir = "{out}"', "[model]\ntext_seq_len = 16",
            f"[training]\nmax_steps = 3\nbatch_size = {batch}\ndataloader_workers = 0",
            '[tokenizer]\nname = "tiny_chars"', '[dataset]\nname = "tiny_codes"\nsize = 32',
            '[backend]\nname = "cuda"\nprecision = "fp32"']) + "\n")
        proc = subprocess.run([sys.executable, "-m", "minidalle", "run", str(cfg), *extra],
                              env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors")), proc

    one, _ = run("one", 4)
    two, proc = run("two", 2, "--nproc", "2")
    assert "rank 0/2 (nccl)" in proc.stdout
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 1e-4, f"weights differ by up to {worst:g}"
