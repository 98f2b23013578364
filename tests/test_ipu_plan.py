"""The IPU plan: recipe numbers, pipeline placement, every invalid combination, memory."""
import subprocess
import sys
from pathlib import Path

import pytest

from minidalle.api import load_config
from minidalle.errors import ConfigError, DataError
from minidalle.components.backends.ipu.plan import (
    IPU_MEMORY_BYTES,
    Block,
    build_plan,
    default_layers_per_ipu,
    padded_text_vocab,
    parameter_counts,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The recipe's sizes: yttm BPE 8192 ids (CLIP: padded to 49416 in its config), VQGAN f16-1024.
SIZES = dict(text_vocab=8192, num_image_tokens=1024, fmap_size=16)


def plan_of(name, *overrides, **kwargs):
    cfg = load_config(CONFIGS / name, list(overrides))
    sizes = dict(SIZES, text_vocab=cfg.model.text_vocab or SIZES["text_vocab"])
    sizes.update(kwargs)
    return build_plan(cfg, **sizes)


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name, replicas, accumulation, ipus, rts", [
    ("l16.toml", 1, 8192, 4, False),
    ("l16_pod16.toml", 4, 2048, 16, True),
    ("l16_pod64.toml", 16, 512, 64, True),
])
def test_l16_recipes_take_24576_samples_per_step(name, replicas, accumulation, ipus, rts):
    plan = plan_of(name)
    assert plan.samples_per_step == 24_576
    assert (plan.micro_batch_size, plan.gradient_accumulation, plan.replication_factor,
            plan.device_iterations) == (3, accumulation, replicas, 1)
    assert plan.total_ipus == plan.requested_ipus == ipus
    assert plan.ipus_per_replica == 4
    assert plan.enable_rts is rts
    assert plan.layers_per_ipu == (0, 6, 6, 4)
    assert plan.embedding_serialization_factor == 4
    assert plan.fp16 and plan.half_partials and plan.stochastic_rounding
    assert plan.loss_scaling == 32768
    assert (plan.accum_dtype, plan.first_order_momentum_dtype,
            plan.second_order_momentum_dtype) == ("float16", "float16", "float32")
    assert plan.optimizer == "adam" and plan.lr == 5e-3
    assert plan.available_memory_proportion == {f"IPU{i}": 0.6 for i in range(4)}
    assert plan.warnings == ()


def test_l16_recipe_training_numbers():
    cfg = load_config(CONFIGS / "l16_pod64.toml")
    t = cfg.training
    assert (t.epochs, t.lr_scheduler, t.dataloader_workers, t.checkpoint_every) == (800, "multi_step", 64, 5000)
    m = cfg.model
    assert (m.dim, m.depth, m.heads, m.dim_head, m.text_seq_len, m.loss_img_weight) == (512, 16, 16, 64, 80, 7.0)
    assert m.attn_types == ["axial_row", "axial_row", "axial_col", "axial_row", "axial_row",
                            "axial_row", "axial_col", "axial_row", "axial_row", "axial_row",
                            "axial_col", "full", "axial_row", "axial_row", "axial_col", "full"]
    assert (cfg.tokenizer.name, cfg.codec.name, cfg.dataset.name) == ("yttm", "vqgan", "coco")
    assert load_config(CONFIGS / "l16.toml").training.dataloader_workers == 4


def test_clip_vocab_recipe():
    plan = plan_of("l16_clip_vocab.toml", dataset_size=118_287)
    assert plan.samples_per_step == 15
    assert plan.layers_per_ipu == (0, 7, 7, 2)
    assert plan.embedding_serialization_factor == 8
    assert plan.available_memory_proportion == {f"IPU{i}": 0.2 for i in range(4)}
    assert plan.loss_scaling == 16384 and plan.lr == 3e-4
    assert plan.text_rows % 8 == 0 and plan.logits_dim % 8 == 0
    assert plan.steps_per_epoch == 118_287 // 15
    cfg = load_config(CONFIGS / "l16_clip_vocab.toml")
    assert cfg.model.sandwich_norm and cfg.tokenizer.name == "clip"
    # the CLIP tokenizer's 49409 ids, padded so that 8 divides table and logits
    assert cfg.model.text_vocab == padded_text_vocab(49409, 80, 1024, 8) == 49416


# --------------------------------------------------------------------------- placement


def test_placement_0_6_6_4():
    plan = plan_of("l16.toml")
    assert plan.blocks == (
        Block("codec", "codec", 0),
        Block("text_emb", "embeddings", 0),
        Block("transformer.layers.0", "transformer_0", 1),
        Block("transformer.layers.6", "transformer_6", 2),
        Block("transformer.layers.12", "transformer_12", 3),
    )
    assert [s.layers for s in plan.stages] == [(), tuple(range(6)), tuple(range(6, 12)),
                                                tuple(range(12, 16))]
    assert [s.parts for s in plan.stages] == [("codec", "embeddings"), ("layers 0-5",),
                                               ("layers 6-11",), ("layers 12-15", "output")]
    assert plan.output_ipu == 3 and plan.embedding_ipu == 0 and plan.codec_on_device
    assert plan.pipelined


def test_placement_0_7_7_2():
    plan = plan_of("l16_clip_vocab.toml")
    starts = [(b.module, b.ipu) for b in plan.blocks if b.module.startswith("transformer")]
    assert starts == [("transformer.layers.0", 1), ("transformer.layers.7", 2),
                      ("transformer.layers.14", 3)]
    assert [len(s.layers) for s in plan.stages] == [0, 7, 7, 2]
    assert plan.stages[3].parts == ("layers 14-15", "output")


def config_with(name, **tables):
    from minidalle.api import config_from_dict
    from minidalle.config import load_raw

    data, origins = load_raw(CONFIGS / name)
    data.update(tables)
    return config_from_dict(data, str(CONFIGS / name), origins)


def test_output_ipu_gets_its_own_block_and_codes_data_keep_the_codec_off():
    cfg = config_with("l16.toml", dataset={"name": "codes", "path": "x"})
    assert not build_plan(cfg, **SIZES).codec_on_device
    plan = plan_of("l16.toml", "backend.layers_per_ipu=[2,6,8]", "backend.output_ipu=3",
                   codec_on_device=False)
    assert not plan.codec_on_device
    assert plan.blocks[0] == Block("text_emb", "embeddings", 0)
    assert Block("transformer.layers.0", "transformer_0", 0) in plan.blocks
    assert plan.blocks[-1] == Block("norm_out", "output", 3)
    assert plan.stages[3].parts == ("output",)
    assert plan.layers_per_ipu == (2, 6, 8, 0)  # a shorter list leaves the last IPUs empty


def test_default_layers_per_ipu():
    assert default_layers_per_ipu(16, 4) == [0, 6, 5, 5]
    assert default_layers_per_ipu(3, 1) == [3]
    assert default_layers_per_ipu(2, 4) == [0, 1, 1, 0]
    plan = plan_of("l16.toml", "backend.layers_per_ipu=[0, 8, 8]", "backend.ipus_per_replica=3")
    assert plan.layers_per_ipu == (0, 8, 8) and plan.requested_ipus == 4
    assert any("not a power of two" in w for w in plan.warnings)


def test_unit_test_recipe_on_one_ipu():
    cfg = config_with("unit_test.toml", backend={"name": "ipu", "ipus_per_replica": 1})
    plan = build_plan(cfg, text_vocab=64, num_image_tokens=32, fmap_size=4)
    assert plan.samples_per_step == 2 and plan.total_ipus == 1
    assert plan.layers_per_ipu == (1,) and not plan.pipelined
    assert not plan.fp16 and plan.accum_dtype == "float32"


def test_dataloader_settings():
    plan = plan_of("l16_pod16.toml")
    assert (plan.dataloader_mode, plan.dataloader_workers, plan.rebatched_worker_size) == (
        "async_rebatched", 64, 2048 // 4)
    plan = plan_of("l16.toml", "backend.dataloader_mode=async")
    assert plan.rebatched_worker_size is None
    assert plan_of("l16.toml").executable_cache_dir == "output/ipu_cache"
    assert plan_of("l16.toml", "backend.rebatched_worker_size=100").rebatched_worker_size == 100


def test_steps_per_epoch_drop_the_remainder():
    plan = plan_of("l16_pod64.toml", dataset_size=118_287)
    assert plan.steps_per_epoch == 4
    assert plan_of("l16.toml", dataset_size=24_576).steps_per_epoch == 1


# --------------------------------------------------------------------------- invalid


@pytest.mark.parametrize("overrides, kwargs, message", [
    (["backend.layers_per_ipu=[0,6,6,3]"], {},
     "backend.layers_per_ipu: [0, 6, 6, 3] places 15 layers but model.depth is 16"),
    (["backend.layers_per_ipu=[0,4,4,4,4]"], {},
     "backend.layers_per_ipu: 5 entries [0, 4, 4, 4, 4] but backend.ipus_per_replica is 4"),
    (["backend.embedding_serialization_factor=32"], {},
     "backend.embedding_serialization_factor: 32 does not divide the 8272 rows of the text "
     "embedding (text vocabulary 8192 + text_seq_len 80); pad the vocabulary with "
     "model.text_vocab = 8208"),
    (["backend.embedding_serialization_factor=3"], {},
     "backend.embedding_serialization_factor: 3 does not divide the 8272 rows"),
    (["backend.embedding_serialization_factor=4"], {"text_vocab": 8194},
     "backend.embedding_serialization_factor: 4 does not divide the 8274 rows of the text "
     "embedding (text vocabulary 8194 + text_seq_len 80); pad the vocabulary with "
     "model.text_vocab = 8196"),
    (["backend.embedding_serialization_factor=8"], {"num_image_tokens": 1020},
     "8 does not divide the 9292 output logits (8272 text + 1020 image tokens)"),
    (["backend.matmul_proportion=[0.2, 0.3]"], {},
     "backend.matmul_proportion: 2 values but backend.ipus_per_replica is 4"),
    (["backend.embedding_ipu=4"], {}, "backend.embedding_ipu: IPU 4 does not exist"),
    (["backend.output_ipu=9"], {}, "backend.output_ipu: IPU 9 does not exist"),
    (["backend.enable_rts=true"], {},
     "backend.enable_rts: replicated tensor sharding needs training.replication_factor > 1, got 1"),
    (["training.gradient_accumulation=6"], {},
     "training.gradient_accumulation: 6 is too small for a pipeline over 4 IPUs: it must be at least 7"),
    (["backend.rebatched_worker_size=30000"], {},
     "backend.rebatched_worker_size: 30000 is larger than one step's 24576 samples"),
    (["backend.compile_only=true", "backend.ipu_model=true"], {},
     "backend.compile_only: offline compilation cannot be combined with backend.ipu_model"),
    (["backend.ipus_per_replica=3", "backend.layers_per_ipu=[0,8,8]",
      "backend.auto_round_num_ipus=false"], {},
     "backend.auto_round_num_ipus: 3 IPUs x 1 replicas = 3 IPUs is not a power of two"),
])
def test_invalid_combinations(overrides, kwargs, message):
    with pytest.raises(ConfigError) as exc:
        plan_of("l16.toml", *overrides, **kwargs)
    text = str(exc.value)
    # errors between [backend] keys alone come at load time and name where the key was set
    assert text.split(": ", 1)[0] in (str(CONFIGS / "l16.toml"), "--set")
    assert message in text


def test_dataset_smaller_than_one_step():
    with pytest.raises(DataError) as exc:
        plan_of("l16_pod16.toml", dataset_size=20_000)
    assert ("the dataset has 20,000 samples, fewer than one step's 24,576 (batch_size 3 x "
            "gradient_accumulation 2048 x replication_factor 4 x device_iterations 1)") in str(exc.value)


@pytest.mark.parametrize("override, message", [
    ("backend.matmul_proportion=1.5", "backend.matmul_proportion: expected a float in (0, 1], got 1.5"),
    ("backend.matmul_proportion=[0.5, 0]", "backend.matmul_proportion[1]: expected a float in (0, 1], got 0"),
    ("backend.matmul_proportion=[]", "backend.matmul_proportion: expected a float in (0, 1] or a list"),
    ("backend.layers_per_ipu=[0,-2,18]", "backend.layers_per_ipu[1]: expected a number >= 0, got -2"),
    ("backend.layers_per_ipu=[]", "backend.layers_per_ipu: expected a non-empty list"),
    ("backend.dataloader_mode=fast", "backend.dataloader_mode: expected one of 'sync', 'async', 'async_rebatched'"),
    ("backend.ipus_per_replica=0", "backend.ipus_per_replica: expected a positive number, got 0"),
    ("backend.fp16=1", "backend.fp16: expected a boolean, got 1"),
    ("backend.layers_per_ipu=[0,6.5]", "backend.layers_per_ipu[1]: expected an integer, got 6.5"),
    ("backend.pipeline=3", "backend.pipeline: unknown key"),
])
def test_ipu_config_validation(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "l16.toml", [override])
    assert message in str(exc.value)


def test_matmul_proportion_per_ipu_list():
    plan = plan_of("l16.toml", "backend.matmul_proportion=[0.1, 0.2, 0.3, 0.4]")
    assert plan.available_memory_proportion == {"IPU0": 0.1, "IPU1": 0.2, "IPU2": 0.3, "IPU3": 0.4}
    plan = plan_of("l16.toml", "backend.matmul_proportion=[0.3]")
    assert set(plan.available_memory_proportion.values()) == {0.3}


# --------------------------------------------------------------------------- memory


def test_parameter_counts_match_the_model():
    from minidalle.api import config_from_dict
    from minidalle.model import build_model

    for sandwich in (False, True):
        cfg = config_from_dict({"model": {"dim": 32, "depth": 3, "heads": 2, "dim_head": 16,
                                          "text_seq_len": 8, "sandwich_norm": sandwich,
                                          "attn_types": ["axial_row", "full"]}})
        model = build_model(cfg, text_vocab=24, num_image_tokens=16, fmap_size=4)
        c = parameter_counts(cfg.model, text_vocab=24, num_image_tokens=16, fmap_size=4)
        parts = {"text_emb": model.text_emb, "text_pos_emb": model.text_pos_emb,
                 "image_emb": model.image_emb, "image_pos_emb": model.image_pos_emb,
                 "layer": model.transformer.layers[0]}
        for key, module in parts.items():
            assert c[key] == sum(p.numel() for p in module.parameters()), key
        out = sum(p.numel() for p in [*model.norm_out.parameters(), *model.to_logits.parameters()])
        assert c["to_logits"] == out
        assert sum(v for k, v in c.items() if k != "layer") + 3 * c["layer"] == sum(
            p.numel() for p in model.parameters())


def test_memory_estimate_l16():
    plan = plan_of("l16.toml", codec_params=1_000_000)
    counts = parameter_counts(load_config(CONFIGS / "l16.toml").model, **SIZES)
    layer = counts["layer"]
    s1 = plan.stages[1]
    assert s1.trainable_params == 6 * layer and s1.frozen_params == 0
    # fp16 weights (2) + fp16 accumulators (2) + fp16 first moment (2) + fp32 second moment (4)
    assert s1.weight_bytes == 2 * 6 * layer
    assert s1.optimizer_bytes == 8 * 6 * layer
    s0 = plan.stages[0]
    assert s0.frozen_params == 1_000_000 and s0.weight_bytes == 2 * s0.trainable_params + 4 * 1_000_000
    assert plan.stages[3].trainable_params == 4 * layer + counts["to_logits"]
    assert sum(s.trainable_params for s in plan.stages) == sum(
        v for k, v in counts.items() if k != "layer") + 16 * layer
    assert all(0 < s.memory_bytes < IPU_MEMORY_BYTES for s in plan.stages)
    # RTS shards the Adam moments over the replicas; accumulators stay whole
    pod = plan_of("l16_pod16.toml").stages[1]
    assert pod.optimizer_bytes == int(6 * layer * (2 + 6 / 4))
    offchip = plan_of("l16.toml", "backend.optimizer_state_offchip=true").stages[1]
    assert offchip.optimizer_bytes == 2 * 6 * layer
    fp32 = plan_of("l16.toml", "backend.fp16=false", "backend.half_first_order_momentum=false")
    assert fp32.stages[1].memory_bytes == 16 * 6 * layer


def test_memory_warning_names_the_ipu():
    plan = plan_of("l16.toml", "model.depth=40", "backend.layers_per_ipu=[0, 30, 6, 4]")
    assert plan.stages[1].over_memory and not plan.stages[2].over_memory
    assert any(w.startswith("IPU 1: estimated") and "exceeds the 900 MB of a Mk2 IPU" in w
               for w in plan.warnings)


def test_fp16_without_loss_scaling_warns():
    plan = plan_of("l16.toml", "training.loss_scaling=1.0")
    assert any("loss_scaling = 1" in w for w in plan.warnings)


def test_plan_module_imports_no_torch():
    code = "import sys, minidalle.components.backends.ipu.plan, minidalle.components.backends.ipu; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_ipu_configs_validate():
    for name in ("l16.toml", "l16_pod16.toml", "l16_pod64.toml", "l16_clip_vocab.toml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.backend.name == "ipu"
