"""Property-based tests (hypothesis) for issue 17: whatever a user feeds in (config values,
``--set`` strings, ``meta.json`` contents, image files), a failure is one line with exit 2,
never a traceback, and nothing already written changes. Kept small (``max_examples``) so
they add seconds to ``make test``."""
import contextlib
import hashlib
import io
import json
import math
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (the `test` extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from minidalle.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*argv) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(list(argv))
    _cli.out = out.getvalue()
    return rc, err.getvalue()


def _floats(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _floats(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _floats(v)
    elif isinstance(tree, float):
        yield tree


def _assert_one_line(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err, err
    if rc:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minidalle: error: "), err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "c.toml").write_text(f'extends = "{ROOT / "configs" / "unit_test.toml"}"\n'
                                   f'[run]\nout_dir = "{folder / "out"}"\n')
    return folder


def _toml_value(value) -> str:
    import tomli_w

    if isinstance(value, dict):  # an inline table (the values are scalars)
        return "{" + ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


KEYS = ["training.lr", "training.betas", "training.eps", "training.epochs", "training.batch_size",
        "training.max_bad_steps", "training.max_grad_norm", "training.lr_scheduler",
        "training.val_fraction", "model.dim", "model.depth", "model.attn_types",
        "model.text_seq_len", "model.loss_img_weight", "run.seed", "run.stages",
        "generate.temperature", "generate.top_p", "backend.name", "tokenizer"]
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-2**80, max_value=2**80),
    st.booleans(), st.text(max_size=12), st.lists(st.floats(allow_nan=True), max_size=3),
    st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2))


@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_config_value_is_accepted_or_one_line(workdir, key, value):
    before = _digest(workdir)
    rc, err = _cli("config", "show", str(workdir / "c.toml"), "--set", f"{key}={_toml_value(value)}")
    _assert_one_line(rc, err)
    if rc:
        assert key.split(".")[0] in err
    else:  # an accepted config holds no inf/NaN (they pass validation only to blow up later)
        import tomli

        assert all(math.isfinite(f) for f in _floats(tomli.loads(_cli.out))), _cli.out
    assert _digest(workdir) == before


@FUZZ
@given(item=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_any_set_string_is_accepted_or_one_line(workdir, item):
    before = _digest(workdir)
    rc, err = _cli("config", "show", str(workdir / "c.toml"), "--set", item)
    _assert_one_line(rc, err)
    assert _digest(workdir) == before


# --------------------------------------------------------------------------- meta.json


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from minidalle.train.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("ckpt")
    step = save_checkpoint(folder / "checkpoints", step=1, config={"run": {"name": "x"}},
                           model_state={"w": torch.ones(2, 3), "b": torch.zeros(3)},
                           training_state={"optimizer": {"lr": 0.1, "t": torch.arange(3)}})
    return step, (step / "meta.json").read_text()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
META_KEYS = ["format_version", "step", "epoch", "config", "files", "model_aliases",
             "training_state", "info"]


@FUZZ
@given(data=st.data())
def test_any_meta_json_loads_or_is_one_checkpoint_error(checkpoint, data):
    from minidalle.errors import CheckpointError
    from minidalle.train.checkpoint import load_checkpoint

    step_dir, original = checkpoint
    meta = json.loads(original)
    if data.draw(st.booleans()):  # replace a few fields
        for key in data.draw(st.lists(st.sampled_from(META_KEYS), min_size=1, max_size=3)):
            meta[key] = data.draw(JSON)
    else:  # or the whole document
        meta = data.draw(JSON)
    weights = _digest(step_dir)
    weights.pop("meta.json")
    try:
        (step_dir / "meta.json").write_text(json.dumps(meta))
        try:
            ck = load_checkpoint(step_dir, with_config=False)
            assert set(ck.state_dict) >= {"w", "b"}
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(step_dir) in str(exc)
        after = _digest(step_dir)
        after.pop("meta.json")
        assert after == weights
    finally:
        (step_dir / "meta.json").write_text(original)


# --------------------------------------------------------------------------- image files


@pytest.fixture(scope="module")
def png_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


@FUZZ
@given(data=st.data())
def test_any_image_file_loads_or_is_skipped(tmp_path, png_bytes, data):
    """Random bytes, truncated or bit-flipped PNGs and odd modes: a uint8 [3, S, S] image
    or None (the dataset skips it with a warning), never an exception."""
    import numpy as np
    import torch
    from PIL import Image

    from minidalle.data import load_image

    kind = data.draw(st.sampled_from(["bytes", "truncated", "flipped", "mode"]))
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=200))
    elif kind == "truncated":
        raw = png_bytes[: data.draw(st.integers(0, len(png_bytes)))]
    elif kind == "flipped":
        raw = bytearray(png_bytes)
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[i] ^= 0xFF
        raw = bytes(raw)
    else:
        mode = data.draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"]))
        w, h = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
        dtype = {"I;16": np.uint16, "I": np.int32}.get(mode, np.uint8)
        if mode in ("I;16", "I"):
            array = np.asarray(data.draw(st.lists(st.integers(0, 65535), min_size=w * h, max_size=w * h)),
                               dtype=dtype).reshape(h, w)
            img = Image.fromarray(array)
        else:
            img = Image.new(mode, (w, h), data.draw(st.integers(0, 255)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        raw = buf.getvalue()
    path = tmp_path / "x.png"
    path.write_bytes(raw)
    image = load_image(path, 8)
    assert image is None or (image.dtype == torch.uint8 and image.shape == (3, 8, 8))
    assert path.read_bytes() == raw
