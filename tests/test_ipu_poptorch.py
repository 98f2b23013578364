"""The thin PopTorch layer and the ipu backend, against a recording fake of PopTorch's
documented API (tests/fake_poptorch). Real PopTorch is tested in tests/equivalence when
present."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fake_poptorch  # noqa: E402

from minidalle.api import load_config  # noqa: E402
from minidalle.errors import ConfigError, UnavailableComponentError  # noqa: E402
from minidalle.components.backends.ipu.plan import build_plan  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = dict(text_vocab=8192, num_image_tokens=1024, fmap_size=16)
# small vocabularies for anything that builds a model
SMALL = dict(text_vocab=256, num_image_tokens=64, fmap_size=8)


def plan_of(name, *overrides, **sizes):
    return build_plan(load_config(CONFIGS / name, list(overrides)), **{**SIZES, **sizes})


@pytest.fixture
def poptorch(monkeypatch):
    return fake_poptorch.install(monkeypatch)


def test_options_for_l16_pod64(poptorch):
    from minidalle.components.backends.ipu.poptorch_layer import make_options

    opts = make_options(plan_of("l16_pod64.toml"), poptorch)
    assert opts.calls == [
        ("replicationFactor", 16),
        ("autoRoundNumIPUs", True),
        ("deviceIterations", 1),
        ("randomSeed", 42),
        ("Training.gradientAccumulation", 512),
        ("Training.accumulationAndReplicationReductionType", poptorch.ReductionType.Mean),
        ("outputMode", poptorch.OutputMode.All),
        ("Precision.enableStochasticRounding", True),
        ("Precision.setPartialsType", torch.float16),
        ("setAvailableMemoryProportion", {"IPU0": 0.6, "IPU1": 0.6, "IPU2": 0.6, "IPU3": 0.6}),
        ("TensorLocations.setOptimizerLocation", {"onChip": True, "useReplicatedTensorSharding": True}),
        ("setExecutionStrategy", poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement)),
        ("enableExecutableCaching", "output/ipu_cache"),
        ("_Popart.set", "disableGradAccumulationTensorStreams", True),
        ("_Popart.set", "outlineThreshold", 10.0),
    ]


def test_options_for_clip_vocab_and_the_optional_switches(poptorch):
    from minidalle.components.backends.ipu.poptorch_layer import make_options

    plan = plan_of("l16_clip_vocab.toml", "backend.ipu_model=true", "backend.synthetic_data=true",
                   "backend.automatic_loss_scaling=true", "backend.optimizer_state_offchip=true",
                   "backend.enable_half_partials=false", "backend.executable_cache_dir=''",
                   text_vocab=49416)
    calls = dict((c[0], c[1:]) for c in make_options(plan, poptorch).calls if c[0] != "_Popart.set")
    assert calls["setAvailableMemoryProportion"] == ({f"IPU{i}": 0.2 for i in range(4)},)
    assert calls["Training.gradientAccumulation"] == (15,)
    assert calls["replicationFactor"] == (1,)
    assert calls["useIpuModel"] == (True,) and calls["enableSyntheticData"] == (True,)
    assert calls["Training.setAutomaticLossScaling"] == (True,)
    assert calls["Precision.setPartialsType"] == (torch.float32,)
    assert calls["TensorLocations.setOptimizerLocation"] == (
        {"onChip": False, "useReplicatedTensorSharding": False},)
    assert "enableExecutableCaching" not in calls
    plan = plan_of("l16.toml", "backend.compile_only=true")
    assert ("useOfflineIpuTarget", 2) in make_options(plan, poptorch).calls


def test_single_ipu_plan_is_not_pipelined(poptorch):
    from minidalle.components.backends.ipu.poptorch_layer import make_options

    plan = plan_of("l16.toml", "backend.ipus_per_replica=1", "backend.layers_per_ipu=[16]")
    names = [c[0] for c in make_options(plan, poptorch).calls]
    assert "setExecutionStrategy" not in names


def test_popdist_options_under_poprun(monkeypatch):
    env = dict(total_replicas=16, local_replicas=4, instances=4, index=2, ipus_per_replica=4)
    poptorch = fake_poptorch.install(monkeypatch, popdist_env=env)
    from minidalle.components.backends.ipu.poptorch_layer import import_popdist, instances_from_popdist, make_options

    popdist = import_popdist()
    plan = plan_of("l16_pod64.toml")
    opts = make_options(plan, poptorch, popdist)
    assert opts.calls[0] == ("popdist.poptorch.Options", 4)
    assert "replicationFactor" not in [c[0] for c in opts.calls]
    inst = instances_from_popdist(plan, popdist)
    assert (inst.count, inst.index, inst.local_replicas) == (4, 2, 4)
    with pytest.raises(ConfigError, match="PopRun started 16 replicas .* asks for 4"):
        instances_from_popdist(plan_of("l16_pod16.toml"), popdist)
    env["ipus_per_replica"] = 2
    with pytest.raises(ConfigError, match="PopRun gives 2 IPUs per replica"):
        instances_from_popdist(plan, popdist)


def test_optimizer_mapping(poptorch):
    from minidalle.components.backends.ipu.poptorch_layer import make_optimizer

    model = torch.nn.Linear(4, 4)
    cfg = load_config(CONFIGS / "l16.toml")
    opt = make_optimizer(plan_of("l16.toml"), model, cfg.training, poptorch)
    assert type(opt).__name__ == "Adam"
    assert opt.ipu_args == {"loss_scaling": 32768.0, "accum_type": torch.float16,
                            "first_order_momentum_accum_type": torch.float16,
                            "second_order_momentum_accum_type": torch.float32}
    g = opt.param_groups[0]
    assert (g["lr"], g["eps"], g["weight_decay"], g["betas"]) == (5e-3, 1e-6, 0.0, (0.9, 0.999))
    assert opt.variable_attrs.isConstant("weight_decay")
    assert not opt.variable_attrs.isConstant("lr")  # scheduled through setOptimizer
    cfg = load_config(CONFIGS / "unit_test.toml", ["training.max_grad_norm=1.0"])
    plan = build_plan(load_config(CONFIGS / "l16.toml", ["backend.fp16=false",
                                                          "backend.half_first_order_momentum=false"]),
                      **SIZES)
    opt = make_optimizer(plan, model, cfg.training, poptorch)
    assert type(opt).__name__ == "AdamW"
    assert opt.ipu_args["accum_type"] == torch.float32 and opt.ipu_args["max_grad_norm"] == 1.0


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_mapping(poptorch):
    from minidalle.components.backends.ipu.poptorch_layer import make_dataloader, make_options

    plan = plan_of("l16_pod16.toml")
    opts = make_options(plan, poptorch)
    loader = make_dataloader(plan, opts, list(range(30_000)), poptorch)
    assert loader.combinedBatchSize == 24_576 == plan.samples_per_step
    assert loader.poptorch_args == dict(
        batch_size=3, shuffle=False, num_workers=64, drop_last=True, persistent_workers=True,
        auto_distributed_partitioning=True, mode=poptorch.DataLoaderMode.AsyncRebatched,
        async_options={"early_preload": True, "load_indefinitely": True},
        rebatched_worker_size=512)
    with pytest.raises(RuntimeError, match="frozen"):
        opts.deviceIterations(2)
    sync = plan_of("l16.toml", "backend.dataloader_mode=sync", "training.dataloader_workers=0")
    loader = make_dataloader(sync, make_options(sync, poptorch), list(range(10)), poptorch,
                             partition=False)
    assert loader.poptorch_args["mode"] == poptorch.DataLoaderMode.Sync
    assert loader.poptorch_args["async_options"] is None
    assert loader.poptorch_args["persistent_workers"] is False
    assert loader.poptorch_args["auto_distributed_partitioning"] is False


def small_model(depth=4, **model):
    from minidalle.api import config_from_dict
    from minidalle.model import build_model

    cfg = config_from_dict({"model": {"dim": 32, "depth": depth, "heads": 2, "dim_head": 16,
                                      "text_seq_len": 8, "attn_types": ["axial_row", "full"], **model}})
    torch.manual_seed(0)
    return build_model(cfg, text_vocab=24, num_image_tokens=16, fmap_size=4)


def test_transforms_call_poptorch_ops(poptorch):
    from minidalle.api import config_from_dict
    from minidalle.components.backends.ipu.poptorch_layer import PoptorchOps
    from minidalle.components.backends.ipu.transforms import apply_plan

    cfg = config_from_dict({"model": {"depth": 4, "text_seq_len": 8},
                            "training": {"gradient_accumulation": 8},
                            "backend": {"name": "ipu", "layers_per_ipu": [0, 2, 1, 1],
                                        "embedding_serialization_factor": 4}})
    plan = build_plan(cfg, text_vocab=24, num_image_tokens=16, fmap_size=4)
    model = small_model()
    plain = model(torch.randint(0, 24, (2, 8)), torch.randint(0, 16, (2, 16)), return_loss=True)
    apply_plan(model, plan, PoptorchOps(poptorch))
    assert poptorch.ops_calls == [("BeginBlock", "embeddings", 0), ("BeginBlock", "transformer_0", 1),
                                  ("BeginBlock", "transformer_2", 2), ("BeginBlock", "transformer_3", 3)]
    poptorch.ops_calls.clear()
    torch.manual_seed(1)
    text, image = torch.randint(0, 24, (2, 8)), torch.randint(0, 16, (2, 16))
    model(text, image, return_loss=True)
    assert poptorch.ops_calls.count(("recomputationCheckpoint", 1)) == 4
    assert ("serializedMatMul", poptorch.MatMulSerializationMode.OutputChannels, 4) in poptorch.ops_calls
    assert plain.shape == ()


def test_codec_block_wraps_encode(poptorch):
    from minidalle.components.backends.ipu.poptorch_layer import PoptorchOps
    from minidalle.components.backends.ipu.transforms import annotate_pipeline
    from minidalle.components.backends.ipu.plan import Block

    class Codec(torch.nn.Module):
        num_tokens, fmap_size = 16, 4

        def encode(self, images):
            return torch.zeros(images.shape[0], 16, dtype=torch.long)

    model = small_model()
    model.set_codec(Codec())
    plan = type("P", (), {"blocks": (Block("codec", "codec", 0),), "recompute_checkpoints": False})
    annotate_pipeline(model, plan, PoptorchOps(poptorch))
    model(torch.randint(0, 24, (1, 8)), torch.rand(1, 3, 16, 16), return_loss=True)
    assert poptorch.ops_calls == [("Block", "codec", 0)]
    assert model.codec.num_tokens == 16  # attributes pass through the wrapper


def test_ipu_backend_runs_the_trainer_sequence(poptorch):
    """setup_model -> build_optimizer -> prepare -> compile -> train_step -> lr_changed ->
    sync_to_host -> close, on the fake (which simulates the host calls on the CPU)."""
    from minidalle.testing.backend import fixed_batch, unit_test_config
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry

    backend = get_registry().build("backend", "ipu", {"ipus_per_replica": 1})
    cfg = unit_test_config(training={"gradient_accumulation": 4, "device_iterations": 2})
    model = build_model(cfg, **SMALL)
    backend.seed(7)
    model = backend.setup_model(model)
    opt = backend.build_optimizer(model, cfg.training)
    runner = backend.prepare(model, opt, cfg.training)
    assert backend.samples_per_step(cfg.training) == 8
    assert "ipu 1 IPUs: 1 x 1 IPUs, fp32, poptorch 3.3.0+fake" == backend.describe()
    batch = fixed_batch(cfg, **SMALL)
    secs = runner.compile(batch)
    assert secs >= 0
    result = runner.train_step(batch)
    assert 0 < result.loss < 20
    for g in opt.param_groups:
        g["lr"] = 1e-4
    runner.lr_changed()
    runner.sync_to_host()
    ex = poptorch.executors[0]
    assert ex.calls[0] == ("compile", (torch.Size([8, 80]), torch.Size([8, 64])))
    assert ex.calls[1:] == [("call", 8), ("setOptimizer", [1e-4]), ("copyWeightsToHost",)]
    assert ex.options.calls[3] == ("randomSeed", 7)
    assert ("identity_loss", "none") in poptorch.ops_calls
    val = runner.eval_loss({k: v[:2] for k, v in batch.items()})
    assert 0 < val < 20
    runner.close()
    assert ex.calls[-1] == ("detachFromDevice",)
    # PopTorch's input rule: dim 0 must be a multiple of di x rf x ga
    with pytest.raises(ValueError, match="multiple of device_iterations"):
        ex({k: v[:6] for k, v in batch.items()}["text"], batch["image"][:6])


def test_backend_errors_before_running(poptorch):
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry
    from minidalle.testing.backend import unit_test_config

    backend = get_registry().build("backend", "ipu", {"ipus_per_replica": 2,
                                                      "layers_per_ipu": [0, 2]})
    cfg = unit_test_config()
    model = backend.setup_model(build_model(cfg, **SMALL))
    with pytest.raises(ConfigError, match="places 2 layers but model.depth is 1"):
        backend.build_optimizer(model, cfg.training)


def test_make_loader_yields_steps(poptorch):
    from minidalle.testing.backend import unit_test_config
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry

    backend = get_registry().build("backend", "ipu", {"ipus_per_replica": 1, "dataloader_mode": "sync"})
    cfg = unit_test_config()
    model = backend.setup_model(build_model(cfg, **SMALL))
    runner = backend.prepare(model, backend.build_optimizer(model, cfg.training), cfg.training)
    data = [{"x": torch.tensor(i)} for i in range(7)]
    collate = lambda items: {"x": torch.stack([it["x"] for it in items])}  # noqa: E731
    loader = backend.make_loader(data, [6, 5, 4, 3, 2], collate_fn=collate)
    assert [b["x"].tolist() for b in loader] == [[6, 5], [4, 3]]
    runner.close()
    assert loader.terminated


def test_without_poptorch_the_backend_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", None)  # import poptorch -> ImportError
    from minidalle.components.backends.ipu.poptorch_layer import import_poptorch

    with pytest.raises(UnavailableComponentError) as exc:
        import_poptorch()
    text = str(exc.value)
    assert "PopTorch" in text and "Poplar SDK" in text and "--backend cpu" in text


def test_fake_is_gone_after_the_test():
    from minidalle.components.backends.ipu import poptorch_installed

    assert "poptorch" not in sys.modules or sys.modules["poptorch"].__version__ != fake_poptorch.__version__
    if not poptorch_installed():
        from minidalle.plugin.discovery import get_registry

        assert get_registry().get("backend", "ipu").unavailable_reason(deep=True)


def test_ipu_glue_computes_what_cpu_computes(poptorch):
    """On the fake (a CPU simulation of PopTorch's host call), the ipu backend's glue —
    transforms, Mean reduction over accumulation, loss scaling, optimizer mapping, the
    OutputMode.All loss — gives the cpu reference's losses. This checks our side only."""
    from minidalle.plugin.discovery import get_registry
    from minidalle.testing.backend import check_backend, unit_test_config

    cfg = unit_test_config(training={"loss_scaling": 128.0})
    report = check_backend(
        lambda: get_registry().build("backend", "ipu", {"ipus_per_replica": 1,
                                                        "embedding_serialization_factor": 8}),
        steps=5, atol=1e-6, weights_atol=1e-6, cfg=cfg, sizes=SMALL)
    assert report["max_loss_diff"] <= 1e-6


def test_compile_only_stops_after_compiling(poptorch):
    from minidalle.components.backends.ipu.backend import CompileOnlyDone
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry
    from minidalle.testing.backend import fixed_batch, unit_test_config

    backend = get_registry().build("backend", "ipu", {"ipus_per_replica": 1, "compile_only": True})
    cfg = unit_test_config()
    model = backend.setup_model(build_model(cfg, **SMALL))
    runner = backend.prepare(model, backend.build_optimizer(model, cfg.training), cfg.training)
    assert ("useOfflineIpuTarget", 2) in backend.options.calls
    batch = fixed_batch(cfg, **SMALL)
    assert runner.compile(batch) >= 0
    with pytest.raises(CompileOnlyDone, match="compiled for an offline Mk2 target"):
        runner.train_step(batch)
    assert [c[0] for c in poptorch.executors[0].calls] == ["compile"]


def test_trainer_runs_the_ipu_backend_with_its_dataloader(poptorch, tmp_path, capsys):
    """The whole training loop on the ipu backend (fake PopTorch): poptorch.DataLoader feeds
    the steps, the compile time is logged, weights are copied back for the checkpoint."""
    import _tiny
    from minidalle.train.checkpoint import list_checkpoints
    from minidalle.components.backends.ipu.backend import IpuBackend
    from minidalle.components.backends.ipu.plan import IpuConfig
    from minidalle.train.pipeline import Pipeline
    from minidalle.train.trainer import Trainer, seed_everything

    cfg = _tiny.tiny_config(tmp_path, "training.epochs=2", "training.gradient_accumulation=4")
    seed_everything(cfg.run.seed)
    pipe = Pipeline(cfg, _tiny.registry())
    backend = IpuBackend(IpuConfig(ipus_per_replica=1, dataloader_mode="sync"))
    trainer = Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=pipe.collate,
                      backend=backend, show_progress=False)
    result = trainer.train()
    out = capsys.readouterr().out
    assert result.step == 2 * (16 // 4)  # 16 tiny samples, 4 per step, 2 epochs
    assert "Compiled model in" in out
    assert isinstance(backend._loader, poptorch.DataLoader) and backend._loader.terminated
    ex = poptorch.executors[0]
    assert [c[0] for c in ex.calls].count("call") == result.step
    assert ("copyWeightsToHost",) in ex.calls and ex.calls[-1] == ("detachFromDevice",)
    assert list_checkpoints(tmp_path / "checkpoints")


def test_setup_model_keeps_fp32_linears_off_onednn(poptorch):
    """PopTorch traces standard ops only: the model's linears must call F.linear."""
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry
    from minidalle.testing.backend import unit_test_config

    backend = get_registry().build("backend", "ipu", {"ipus_per_replica": 1, "fp16": False})
    model = backend.setup_model(build_model(unit_test_config(), **SMALL))
    flags = [m.onednn for m in model.modules() if hasattr(m, "onednn")]
    assert flags and not any(flags)
