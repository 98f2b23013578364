"""Configs: extends chains, --set overrides, validation errors naming file and key."""
import subprocess
import sys
import textwrap

import attrs
import pytest

from minidalle import hookimpl
from minidalle.api import load_config
from minidalle.config import config_to_dict, load_raw, parse_override, to_toml
from minidalle.errors import ConfigError
from minidalle.plugin.discovery import load_registry


@attrs.define
class ToyTokenizerConfig:
    path: str = "vocab.txt"
    lowercase: bool = True
    size: int = 10


class ToyPlugin:
    @hookimpl
    def minidalle_tokenizers(self, register):
        register("toy", lambda cfg: cfg, config=ToyTokenizerConfig, summary="test tokenizer")


@pytest.fixture
def registry():
    return load_registry(autoload="none", extra_plugins=[ToyPlugin()])


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_chain_deep_merges_and_set_overrides(tmp_path, registry):
    write(tmp_path / "base.toml", """
        [model]
        dim = 64
        depth = 2
        [training]
        lr = 1e-3
        betas = [0.8, 0.9]
        [tokenizer]
        name = "toy"
        size = 5
    """)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.toml", """
        extends = "../base.toml"
        [model]
        depth = 3
    """)
    leaf = write(tmp_path / "sub" / "leaf.toml", """
        extends = "mid.toml"
        [training]
        epochs = 4
    """)
    cfg = load_config(leaf, ["training.lr=5e-4", "tokenizer.lowercase=false",
                             "model.attn_types=['full','full']"], registry=registry)
    assert (cfg.model.dim, cfg.model.depth) == (64, 3)
    assert cfg.training.epochs == 4 and cfg.training.lr == 5e-4
    assert cfg.training.betas == [0.8, 0.9]
    assert cfg.tokenizer.name == "toy"
    assert cfg.tokenizer.params == ToyTokenizerConfig(path="vocab.txt", lowercase=False, size=5)
    assert cfg.model.attn_types == ["full", "full"]
    # the resolved table round-trips through TOML
    shown = to_toml(cfg)
    again = tmp_path / "again.toml"
    again.write_text(shown)
    assert config_to_dict(load_config(again, registry=registry)) == config_to_dict(cfg)


def test_extends_cycle_is_rejected(tmp_path, registry):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml", registry=registry)


@pytest.mark.parametrize("body, expected", [
    ('[training]\nlr = "fast"\n', 'x.toml: training.lr: expected a float, got "fast"'),
    ('[training]\nepochs = 1.5\n', "x.toml: training.epochs: expected an integer, got 1.5"),
    ('[training]\nepochs = true\n', "x.toml: training.epochs: expected an integer, got True"),
    ('[model]\nsandwich_norm = "yes"\n', 'x.toml: model.sandwich_norm: expected a boolean, got "yes"'),
    ('[training]\nlearning_rate = 1.0\n', "x.toml: training.learning_rate: unknown key"),
    ('[trainig]\nlr = 1.0\n', "x.toml: trainig: unknown section"),
    ('[training]\noptimizer = "sgd"\n', "x.toml: training.optimizer: expected one of"),
    ('[training]\nbetas = [0.9, "a"]\n', 'x.toml: training.betas[1]: expected a float, got "a"'),
    ('[training]\nbatch_size = 0\n', "x.toml: training.batch_size: expected a positive number"),
    ('[tokenizer]\nname = "toy"\nsize = "big"\n', 'x.toml: tokenizer.size: expected an integer, got "big"'),
    ('[tokenizer]\nname = "toy"\ncolour = 1\n', "x.toml: tokenizer.colour: unknown key"),
    ('[tokenizer]\nname = "tyo"\n', "x.toml: tokenizer.name: unknown tokenizer 'tyo': did you mean 'toy'?"),
    ('[tokenizer]\nsize = 3\n', "x.toml: tokenizer.name: expected the name of a registered tokenizer"),
    ('[model]\nattn_types = ["ful"]\n', "x.toml: model.attn_types[0]: unknown attention 'ful': did you mean 'full'?"),
    ('[training\nlr = 1\n', "x.toml: invalid TOML: "),
])
def test_each_config_error_is_one_line_naming_file_and_key(tmp_path, registry, body, expected):
    path = write(tmp_path / "x.toml", body)
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=registry)
    message = str(info.value)
    assert "\n" not in message
    assert message.replace(str(tmp_path) + "/", "").startswith(expected), message


def test_invalid_toml_names_the_line(tmp_path, registry):
    path = write(tmp_path / "x.toml", "[run]\nname = 'a'\nseed = = 3\n")
    with pytest.raises(ConfigError, match=r"line 3"):
        load_config(path, registry=registry)


def test_error_names_the_file_that_set_the_key(tmp_path, registry):
    write(tmp_path / "base.toml", '[training]\nlr = "fast"\n')
    leaf = write(tmp_path / "leaf.toml", 'extends = "base.toml"\n[model]\ndim = 8\n')
    with pytest.raises(ConfigError, match=r"base\.toml: training\.lr"):
        load_config(leaf, registry=registry)
    with pytest.raises(ConfigError, match=r"^--set: training\.lr"):
        load_config(leaf, ["training.lr=slow"], registry=registry)


def test_missing_file_and_missing_parent(tmp_path, registry):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml", registry=registry)
    leaf = write(tmp_path / "leaf.toml", 'extends = "gone.toml"\n')
    with pytest.raises(ConfigError, match="leaf.toml: extends: file not found"):
        load_config(leaf, registry=registry)


def test_parse_override_reads_toml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=hello world") == (["a"], "hello world")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("novalue")


def test_unavailable_component_is_listed_with_its_reason():
    # ipu needs poptorch (the Poplar SDK): it stays registered, and building it says why not.
    from minidalle.errors import UnavailableComponentError
    from minidalle.plugin.discovery import get_registry
    from minidalle.plugin.registry import module_missing

    if not module_missing("poptorch"):
        pytest.skip("poptorch is installed here; the unavailable path needs it absent")
    comp = get_registry().get("backend", "ipu")
    reason = comp.unavailable_reason(deep=True)
    assert reason and "Poplar SDK" in reason
    with pytest.raises(UnavailableComponentError, match="Poplar SDK"):
        comp.build({})


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "minidalle", *args], capture_output=True,
                          text=True, **kw)


def test_cli_config_show_and_errors(tmp_path):
    write(tmp_path / "base.toml", "[model]\ndim = 32\n[training]\nlr = 0.01\n")
    leaf = write(tmp_path / "leaf.toml", 'extends = "base.toml"\n[training]\nepochs = 2\n')
    out = run_cli("config", "show", str(leaf), "--set", "training.lr=0.5")
    assert out.returncode == 0, out.stderr
    import tomli

    shown = tomli.loads(out.stdout)
    assert shown["model"]["dim"] == 32
    assert shown["training"]["epochs"] == 2 and shown["training"]["lr"] == 0.5

    bad = run_cli("config", "show", str(leaf), "--set", "training.lr=fast")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "training.lr" in bad.stderr
    assert "Traceback" not in bad.stderr
    debug = run_cli("--debug", "config", "show", str(leaf), "--set", "training.lr=fast")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
