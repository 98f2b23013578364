"""CPU-vs-backend equivalence: the recipe's `unit_test` comparison for every backend.

Each registered backend that is available on this machine trains the `unit_test` recipe
for 10 steps from the same weights on the same fixed batch as the `cpu` reference, and
every step's loss is compared (minidalle.testing.backend.check_backend). Without an IPU
the `ipu` backend is skipped, but the model transforms it applies (serialized embedding
and output projection, pipeline-block and recomputation annotations) are compared on the
CPU against the plain model.
"""
import os
import tomllib
from pathlib import Path

import pytest

from minidalle.plugin.discovery import load_registry
from minidalle.testing.backend import UNIT_TEST, check_backend, unit_test_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
# The recipe's model and training numbers with small vocabularies (8192 text ids and
# 1024 codes on a 16 x 16 grid cost ~0.5 s per micro-batch on a 2-core CPU): the
# serialization factors below still divide the text table (256 + 80) and logits (+ 64).
SIZES = dict(text_vocab=256, num_image_tokens=64, fmap_size=8)
# Parameters each backend is built with for the recipe's one-layer model.
PARAMS = {"ipu": {"ipus_per_replica": 1}, "cpu": {"precision": "fp32"}}  # cpu: not "auto"
# Loss tolerance per backend: the cpu reference must reproduce itself exactly; devices
# reorder float reductions (the recipe's own test used 1e-6 on an IPU).
ATOL = {"cpu": 0.0}
DEVICE_ATOL = 1e-5


def test_unit_test_constants_are_the_recipe_file():
    data = tomllib.loads((ROOT / "configs" / "unit_test.toml").read_text())
    for section in ("model", "training"):
        for key, value in UNIT_TEST[section].items():
            assert data[section][key] == value, f"{section}.{key}"
    assert data["run"]["seed"] == UNIT_TEST["run"]["seed"]


def transformed_cpu(plan_overrides):
    """The cpu backend running the model with the IPU plan's transforms (CpuOps)."""
    from minidalle.components.backends.cpu import CpuBackend
    from minidalle.components.backends.ipu.backend import plan_for_model
    from minidalle.components.backends.ipu.plan import IpuConfig
    from minidalle.components.backends.ipu.transforms import SerializedEmbedding, SerializedLinear, apply_plan

    class TransformedCpu(CpuBackend):
        def setup_model(self, model):
            model = super().setup_model(model)
            cfg = unit_test_config()
            plan = plan_for_model(IpuConfig(**plan_overrides), model, cfg.training)
            apply_plan(model, plan)
            assert isinstance(model.text_emb, SerializedEmbedding)
            assert isinstance(model.to_logits, SerializedLinear)
            return model

    return TransformedCpu


def test_cpu_transforms_match_the_plain_model():
    """Serialized embedding/projection + stage and recomputation annotations."""
    backend = transformed_cpu({"ipus_per_replica": 1, "embedding_serialization_factor": 8})
    from minidalle.components.backends.cpu import CpuConfig

    report = check_backend(lambda: backend(CpuConfig(precision="fp32")), steps=STEPS, atol=1e-6, weights_atol=1e-6,
                           sizes=SIZES)
    assert len(report["backend"]) == STEPS
    assert report["reference"][-1] < report["reference"][0]  # it trains


def _backend_names():
    return load_registry().names("backend")


def _skip_reason(name, component):
    reason = component.unavailable_reason(deep=True)
    if name == "ipu":
        if reason:
            return ("needs poptorch (Poplar SDK) and an IPU or the IPU Model "
                    f"(POPTORCH_IPU_MODEL=1): {reason}")
        import poptorch

        if not (poptorch.ipuHardwareIsAvailable() or os.environ.get("POPTORCH_IPU_MODEL")):
            return "needs an IPU, or the IPU Model: set POPTORCH_IPU_MODEL=1"
        return None
    return f"backend {name!r} is unavailable here: {reason}" if reason else None


@pytest.mark.parametrize("name", _backend_names())
def test_backend_matches_cpu(name):
    from minidalle.plugin.discovery import get_registry

    registry = get_registry()
    reason = _skip_reason(name, registry.get("backend", name))
    if reason:
        pytest.skip(reason)
    params = PARAMS.get(name, {})
    report = check_backend(lambda: registry.build("backend", name, dict(params)), steps=STEPS,
                           atol=ATOL.get(name, DEVICE_ATOL), registry=registry,
                           sizes=SIZES)
    assert len(report["backend"]) == STEPS
