"""Trainer and the cpu backend on the unit_test recipe with tiny in-memory data."""
import json

import pytest
import torch

import _tiny
from minidalle.train.backend import StepResult, samples_per_step
from minidalle.train.checkpoint import load_checkpoint
from minidalle.components.backends.cpu import CpuBackend, CpuConfig
from minidalle.train.master_weights import MasterWeightsRunner
from minidalle.train.pipeline import Pipeline
from minidalle.train.trainer import Trainer, seed_everything, split_indices
from minidalle.train.trainer import train_from_config as train


def _trainer(cfg, *, precision="fp32", **kw):
    seed_everything(cfg.run.seed)
    pipe = Pipeline(cfg, _tiny.registry())
    backend = CpuBackend(CpuConfig(precision=precision))
    return Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=pipe.collate,
                   backend=backend, show_progress=False, **kw), pipe


def _batch(pipe, n):
    return pipe.collate([pipe.dataset[i] for i in range(n)])


def _runner(cfg, pipe):
    backend = CpuBackend(CpuConfig(precision="fp32"))
    model = backend.setup_model(pipe.model)
    return backend.prepare(model, backend.build_optimizer(model, cfg.training), cfg.training)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_grads(tmp_path, n, *overrides):
    cfg = _tiny.tiny_config(tmp_path, *overrides)
    seed_everything(0)
    pipe = Pipeline(cfg, _tiny.registry())
    runner = _runner(cfg, pipe)
    result = runner.train_step(_batch(pipe, n))
    return result, _grads(runner.model), runner


def test_samples_per_step_formula():
    cfg = _tiny.tiny_config("x", "training.batch_size=3", "training.gradient_accumulation=8192",
                            "training.replication_factor=4", "training.device_iterations=1")
    assert samples_per_step(cfg.training) == 3 * 8192 * 4


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_a_k_times_larger_batch(tmp_path, k):
    acc, g_acc, _ = _step_grads(tmp_path, k, "training.batch_size=1", f"training.gradient_accumulation={k}")
    big, g_big, _ = _step_grads(tmp_path, k, f"training.batch_size={k}", "training.gradient_accumulation=1")
    assert acc.loss == pytest.approx(big.loss, rel=1e-6)
    assert g_acc.keys() == g_big.keys() and len(g_acc) > 5
    for name in g_acc:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_replication_factor_on_cpu_averages_like_accumulation(tmp_path):
    _, g_rep, _ = _step_grads(tmp_path, 2, "training.replication_factor=2", "training.gradient_accumulation=1")
    _, g_acc, _ = _step_grads(tmp_path, 2, "training.gradient_accumulation=2")
    for name in g_rep:
        torch.testing.assert_close(g_rep[name], g_acc[name], rtol=0, atol=0)


def test_static_loss_scaling_gives_the_same_gradients(tmp_path):
    _, g1, _ = _step_grads(tmp_path, 2)
    _, g2, _ = _step_grads(tmp_path, 2, "training.loss_scaling=1024")
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-8)


def test_device_iterations_run_several_updates_per_step(tmp_path):
    result, _, runner = _step_grads(tmp_path, 4, "training.device_iterations=2")
    state = next(iter(runner.optimizer.state.values()))
    assert float(state["step"]) == 2
    assert isinstance(result, StepResult) and result.skipped_updates == 0


def test_gradient_clipping_reports_the_norm(tmp_path):
    result, grads, _ = _step_grads(tmp_path, 2, "training.max_grad_norm=0.01")
    assert result.grad_norm is not None and result.grad_norm > 0.01
    total = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
    assert float(total) == pytest.approx(0.01, rel=1e-3)


def test_unit_test_recipe_loss_goes_down_and_logs(tmp_path, capsys):
    cfg = _tiny.tiny_config(tmp_path, "training.epochs=4", "dataset.size=8")
    trainer, _ = _trainer(cfg)
    result = trainer.train()
    assert result.step == 4 * 4  # 8 samples / (batch 1 x GA 2) per epoch
    out = capsys.readouterr().out
    assert "Throughput: " in out and " samples/sec" in out and "Loss: " in out
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 16 and [r["step"] for r in records] == list(range(1, 17))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, losses
    assert (tmp_path / "checkpoints" / "step-00000016" / "meta.json").exists()


def test_fp32_is_bit_identical_with_the_same_seed(tmp_path):
    def weights(out):
        cfg = _tiny.tiny_config(out, "training.epochs=2")
        trainer, _ = _trainer(cfg)
        trainer.train()
        return trainer.model.state_dict()

    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_another_seed_gives_other_weights(tmp_path):
    def weights(out, seed):
        cfg = _tiny.tiny_config(out, f"run.seed={seed}", "training.max_steps=2")
        trainer, _ = _trainer(cfg)
        trainer.train()
        return trainer.model.to_logits.weight.clone()

    assert not torch.equal(weights(tmp_path / "a", 1), weights(tmp_path / "b", 2))


@pytest.mark.cpu_paths
@pytest.mark.parametrize("precision", ["bf16", "bf16-master"])
def test_bf16_trains_and_stays_close_to_fp32(tmp_path, precision):
    def losses(out, precision):
        cfg = _tiny.tiny_config(out, "training.epochs=2", "dataset.size=8")
        trainer, _ = _trainer(cfg, precision=precision)
        trainer.train()
        return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]

    fp32, bf16 = losses(tmp_path / "fp32", "fp32"), losses(tmp_path / precision, precision)
    assert fp32 != bf16  # bf16 really ran
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.02)
    if precision == "bf16-master":  # checkpoints hold the fp32 masters
        ck = load_checkpoint(tmp_path / precision, with_config=False)
        assert {t.dtype for t in ck.state_dict.values() if t.is_floating_point()} == {torch.float32}


def test_bf16_master_keeps_fp32_masters_and_accumulates_in_fp32(tmp_path):
    def step(n, *overrides):
        cfg = _tiny.tiny_config(tmp_path, *overrides)
        seed_everything(0)
        pipe = Pipeline(cfg, _tiny.registry())
        backend = CpuBackend(CpuConfig(precision="bf16-master"))
        model = backend.setup_model(pipe.model)
        runner = backend.prepare(model, backend.build_optimizer(model, cfg.training), cfg.training)
        assert isinstance(runner, MasterWeightsRunner)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = runner.train_step(_batch(pipe, n))
        return runner, result, before

    runner, result, before = step(4, "training.batch_size=1", "training.gradient_accumulation=4")
    work = dict(runner.work.named_parameters())
    for name, master in runner.model.named_parameters():
        assert master.dtype == torch.float32 and master.grad.dtype == torch.float32
        assert not torch.equal(master, before[name]), name  # the masters were updated
        assert torch.equal(work[name], master.bfloat16()), name  # the bf16 copy follows them
    big, big_result, _ = step(4, "training.batch_size=4", "training.gradient_accumulation=1")
    assert result.loss == pytest.approx(big_result.loss, rel=1e-2)
    grads = dict(big.model.named_parameters())
    for name, p in runner.model.named_parameters():  # 4 micro-batches summed in fp32
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0.05, atol=1e-3, msg=name)


def test_validation_loss_is_recorded(tmp_path, capsys):
    cfg = _tiny.tiny_config(tmp_path, "training.val_fraction=0.25", "training.val_every=2",
                            "training.epochs=1", "dataset.size=16")
    trainer, _ = _trainer(cfg)
    trainer.train()
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6]  # 12 train samples -> 6 steps
    assert all(r["val_loss"] > 0 for r in val)
    assert "Validation step 2 Loss: " in capsys.readouterr().out


def test_split_is_deterministic_and_disjoint():
    tr, va = split_indices(20, 0.25, seed=3)
    assert (tr, va) == split_indices(20, 0.25, seed=3)
    assert len(va) == 5 and not set(tr) & set(va) and sorted(tr + va) == list(range(20))


def test_too_little_data_for_one_step_is_a_clear_error(tmp_path):
    from minidalle.errors import DataError

    cfg = _tiny.tiny_config(tmp_path, "dataset.size=3", "training.batch_size=2")
    trainer, _ = _trainer(cfg)
    with pytest.raises(DataError, match="fewer than one step's 4"):
        trainer.train()


def test_lr_schedule_is_applied_per_step(tmp_path):
    cfg = _tiny.tiny_config(tmp_path, "training.lr_scheduler=multi_step", "training.lr_milestones=[2]",
                            "training.lr_gamma=0.1", "training.warmup_steps=1", "training.max_steps=4")
    trainer, _ = _trainer(cfg)
    trainer.train()
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([3e-4, 3e-4, 3e-5, 3e-5])


def test_callbacks_see_every_step(tmp_path):
    seen = []
    cfg = _tiny.tiny_config(tmp_path, "training.max_steps=3")
    trainer, _ = _trainer(cfg, callbacks=[lambda tr, step, res: seen.append((step, res.loss))])
    trainer.train()
    assert [s for s, _ in seen] == [1, 2, 3]


def test_train_builds_everything_from_the_config(tmp_path):
    cfg = _tiny.tiny_config(tmp_path, "training.max_steps=2")
    result = train(cfg, registry=_tiny.registry(), show_progress=False)
    assert result.step == 2 and result.checkpoint.name == "step-00000002"


def test_tensorboard_and_wandb_are_optional(tmp_path, capsys):
    import importlib.util

    cfg = _tiny.tiny_config(tmp_path, "training.max_steps=1", "training.tensorboard=true")
    trainer, _ = _trainer(cfg)
    trainer.train()
    out = capsys.readouterr().out
    if importlib.util.find_spec("tensorboard") is None:
        assert "`tensorboard` package is not installed" in out
    else:
        assert any((tmp_path / "tensorboard").iterdir())
    if importlib.util.find_spec("wandb") is None:
        cfg = _tiny.tiny_config(tmp_path / "w", "training.max_steps=1", "training.wandb=true")
        trainer, _ = _trainer(cfg)
        trainer.train()
        assert "`wandb` is not installed" in capsys.readouterr().out


def test_no_progress_bar_without_a_terminal(tmp_path, capsys):
    cfg = _tiny.tiny_config(tmp_path, "training.max_steps=1")
    seed_everything(0)
    pipe = Pipeline(cfg, _tiny.registry())
    trainer = Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=pipe.collate,
                      backend=CpuBackend(CpuConfig()))
    assert trainer.show_progress is False  # pytest's stderr is not a terminal
    trainer.train()
    assert "step/s" not in capsys.readouterr().err


def test_micro_batches_are_loaded_as_the_runner_consumes_them(tmp_path):
    """A step of GA micro-batches reaches the cpu runner as an iterator: at the first
    forward only the first micro-batch has been read, and the weights equal those of
    feeding each step as one dict."""
    cfg = _tiny.tiny_config(tmp_path / "a", "training.gradient_accumulation=4", "training.max_steps=2")
    trainer, pipe = _trainer(cfg)
    reads, at_first_forward = [], []
    base_getitem = type(pipe.dataset).__getitem__
    pipe.dataset.__class__ = type("Counting", (type(pipe.dataset),),
                                  {"__getitem__": lambda self, i: reads.append(i) or base_getitem(self, i)})
    hook = trainer.model.register_forward_pre_hook(lambda m, a: at_first_forward.append(len(reads)))
    trainer.train()
    hook.remove()
    assert at_first_forward[0] == 1 and len(reads) == 8

    cfg_b = _tiny.tiny_config(tmp_path / "b", "training.gradient_accumulation=4", "training.max_steps=2")
    trainer_b, pipe_b = _trainer(cfg_b)
    from minidalle.train.trainer import epoch_order

    backend = trainer_b.backend
    model = backend.setup_model(trainer_b.model)
    runner = backend.prepare(model, backend.build_optimizer(model, cfg_b.training), cfg_b.training)
    order = epoch_order(list(range(len(pipe_b.dataset))), cfg_b.run.seed, 0)
    for step in range(2):
        runner.train_step(pipe_b.collate([pipe_b.dataset[i] for i in order[step * 4:(step + 1) * 4]]))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


def test_text_vocab_smaller_than_the_tokenizer_is_a_config_error(tmp_path):
    from minidalle.errors import ConfigError

    vocab = _tiny.TinyTokenizer().vocab_size
    cfg = _tiny.tiny_config(tmp_path, f"model.text_vocab={vocab - 1}")
    with pytest.raises(ConfigError, match="model.text_vocab: .* smaller than the tokenizer"):
        Pipeline(cfg, _tiny.registry())
