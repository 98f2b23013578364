"""The cuda backend's speed options, checked on the CPU where their logic allows it:
axial layers through the masked fused attention, the fused/foreach optimizer switch, the
torch.compile'd training forward, the fixed-shape decoding step that a CUDA graph
replays, and bench's one-line out-of-memory error. On a GPU, tests/equivalence/test_cuda.py
runs them for real."""
import pytest
import torch

from minidalle.model import build_model
from minidalle.testing.backend import fixed_batch, unit_test_config

SIZES = dict(text_vocab=64, num_image_tokens=32, fmap_size=4)
ATTN = ["axial_row", "axial_col", "conv_like", "full"]


def _model(attn=ATTN, seed=0):
    cfg = unit_test_config(model={"text_seq_len": 8, "depth": len(attn), "attn_types": list(attn)})
    torch.manual_seed(seed)
    return cfg, build_model(cfg, **SIZES)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch["text"], batch["image"], return_loss=True)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_axial_sdpa_goes_through_the_masked_kernel_with_the_same_result(monkeypatch):
    from minidalle.components import attention
    from minidalle.components.backends.cuda import set_axial_sdpa

    cfg, model = _model()
    batch = fixed_batch(cfg, **SIZES)
    per_line = _loss_and_grads(model, batch)
    assert set_axial_sdpa(model, True) == 2  # the two axial layers

    def forbidden(*args):
        raise AssertionError("the per-line axial path ran with masked_sdpa on")

    monkeypatch.setattr(attention._AxialCore, "apply", forbidden)
    masked = _loss_and_grads(model, batch)
    assert masked[0] == pytest.approx(per_line[0], abs=1e-5)
    for name, grad in per_line[1].items():
        torch.testing.assert_close(masked[1][name], grad, atol=1e-5, rtol=1e-4)
    set_axial_sdpa(model, False)
    monkeypatch.undo()
    assert _loss_and_grads(model, batch)[0] == pytest.approx(per_line[0], abs=1e-6)


def test_fused_optimizer_key_picks_fused_or_foreach():
    from minidalle.train.optim import build_optimizer

    cfg, model = _model(["full"])
    default = build_optimizer(model.parameters(), cfg.training)
    assert default.defaults["fused"] is True
    foreach = build_optimizer(model.parameters(), cfg.training, fused=False)
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]


def test_cuda_config_takes_the_speed_keys_and_checks_them():
    from minidalle.components.backends.cuda import CudaConfig
    from minidalle.config import structure_section
    from minidalle.errors import ConfigError

    c = structure_section({}, CudaConfig, "backend")
    assert (c.axial_sdpa, c.fused_optimizer, c.compile, c.compile_mode, c.cuda_graphs) == (
        True, True, False, "default", True)
    c = structure_section({"compile": True, "compile_mode": "reduce-overhead", "axial_sdpa": False,
                           "cuda_graphs": False}, CudaConfig, "backend")
    assert c.compile and c.compile_mode == "reduce-overhead" and not c.axial_sdpa
    with pytest.raises(ConfigError, match="backend.compile_mode: expected one of"):
        structure_section({"compile_mode": "fastest"}, CudaConfig, "backend")


def _compiled_cpu_backend(compile: bool):
    """The cpu backend with the cuda backend's runner and its compile keys."""
    from minidalle.components.backends.cpu import CpuBackend
    from minidalle.components.backends.cuda import CudaConfig, CudaRunner, set_axial_sdpa

    class CompiledCpu(CpuBackend):
        def setup_model(self, model):
            set_axial_sdpa(model, True)  # as CudaBackend.setup_model with its default
            return super().setup_model(model)

        def prepare(self, model, optimizer, training):
            self.config = CudaConfig(compile=compile, compile_mode="default")
            return CudaRunner(self, model, optimizer, training)

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

        precision = "fp32"

    return CompiledCpu()


def test_compile_key_trains_through_torch_compile(monkeypatch):
    from minidalle.testing.backend import train_losses

    calls = []
    real = torch.compile

    def compile_eagerly(model, **kwargs):
        # Dynamo and AOTAutograd trace forward and backward as inductor would; no C++ build.
        calls.append(kwargs)
        return real(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.utils.counters.clear()
    cfg, model = _model(["axial_row", "full"])
    batch = fixed_batch(cfg, **SIZES)
    import copy

    plain, w_plain = train_losses(_compiled_cpu_backend(False), copy.deepcopy(model), cfg, batch, 3)
    assert calls == []
    compiled, w_compiled = train_losses(_compiled_cpu_backend(True), copy.deepcopy(model), cfg, batch, 3)
    assert calls == [{"mode": "default"}]
    assert compiled == pytest.approx(plain, abs=1e-5)
    assert max(float((w_plain[k] - w_compiled[k]).abs().max()) for k in w_plain) < 1e-4
    # One graph: a break (e.g. a hand-written backward Dynamo cannot trace) costs speed.
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("attn", [["axial_row"], ATTN])
def test_fixed_shape_decoding_step_matches_cached_decoding(attn):
    from minidalle.inference import graph_decode
    from minidalle.inference.sampling import generate_image_codes

    _, model = _model(attn)
    model.eval()
    text = torch.randint(1, SIZES["text_vocab"], (3, 8), generator=torch.Generator().manual_seed(1))
    plain, static = [], []
    a = generate_image_codes(model, text, seed=0, filter_thres=0.9, on_logits=lambda s, x: plain.append(x))
    b = generate_image_codes(model, text, seed=0, filter_thres=0.9, cuda_graph=True,
                             on_logits=lambda s, x: static.append(x))
    assert (3, False) in graph_decode._steps[model]  # the fixed-shape step ran (eagerly: on the CPU)
    assert torch.equal(a, b)
    assert len(plain) == len(static) == model.image_seq_len
    for x, y in zip(plain, static):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    # Primed, and a second call reusing the same step and buffers.
    prime = a[:, :5]
    c = generate_image_codes(model, text, seed=0, filter_thres=0.9, prime_codes=prime)
    d = generate_image_codes(model, text, seed=0, filter_thres=0.9, prime_codes=prime, cuda_graph=True)
    assert torch.equal(c, d)


def test_fixed_shape_step_is_skipped_under_autocast():
    from minidalle.inference import graph_decode

    _, model = _model(["full"])
    assert graph_decode.supports(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not graph_decode.supports(model)


def test_set_backend_keys_apply_to_the_backend_given_by_flag():
    from pathlib import Path

    from minidalle.commands.run import load_run_config

    l16 = Path(__file__).resolve().parents[1] / "configs" / "l16.toml"  # [backend] name = "ipu"
    cfg = load_run_config(l16, ["backend.precision=bf16", "training.batch_size=5"], "cpu")
    assert cfg.backend.name == "cpu" and cfg.backend.params.precision == "bf16"
    assert cfg.training.batch_size == 5


def test_bench_reports_a_batch_that_does_not_fit_in_one_line(monkeypatch, capsys):
    from pathlib import Path

    from minidalle.cli import main
    from minidalle.bench import training as bench

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(bench, "bench_training", out_of_memory)
    config = Path(__file__).resolve().parents[1] / "configs" / "unit_test.toml"
    assert main(["bench", str(config), "--batch-size", "512", "--no-peak"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 512: does not fit in memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in err
    assert "Traceback" not in err


def test_fixed_shape_steps_go_with_their_model():
    import gc

    from minidalle.inference import graph_decode
    from minidalle.inference.sampling import generate_image_codes

    _, model = _model(["full"])
    generate_image_codes(model.eval(), torch.ones(1, 8, dtype=torch.long), seed=0, cuda_graph=True)
    assert model in graph_decode._steps
    before = len(graph_decode._steps)
    del model
    gc.collect()
    assert len(graph_decode._steps) == before - 1
