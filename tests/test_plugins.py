"""Registry and plugin discovery, with real third-party distributions.

The fixture distributions in ``tests/plugin_fixtures/`` are installed by pip (``--no-deps
--target``) into temporary directories, never into the project venv, and put on the
``PYTHONPATH`` of ``minidalle`` subprocesses: each test sees exactly the plugins it asks for
and nothing is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minidalle.errors import UnknownComponentError
from minidalle.plugin.discovery import load_registry

FIXTURES = Path(__file__).parent / "plugin_fixtures"
HEAVY = ("torch", "torchvision", "webdataset", "youtokentome", "taming", "poptorch")


def _pip_target(tmp: Path, target: str, *names: str) -> Path:
    src = tmp / "src"
    for name in names:
        if not (src / name).exists():
            shutil.copytree(FIXTURES / name, src / name)  # build outside the checkout
    dest = tmp / target
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(dest),
         *(str(src / n) for n in names)],
        check=True, capture_output=True, text=True,
    )
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``ok``: good + broken + raising; ``conflict``: the one that shadows a built-in."""
    tmp = tmp_path_factory.mktemp("plugin_fixtures")
    return {
        "ok": _pip_target(tmp, "ok", "good", "broken", "raising"),
        "conflict": _pip_target(tmp, "conflict", "conflict"),
    }


def run_cli(*args, path: Path | None = None, plugins: str | None = None, cwd=None):
    env = dict(os.environ)
    env.pop("MINIDALLE_PLUGINS", None)
    if plugins is not None:
        env["MINIDALLE_PLUGINS"] = plugins
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "minidalle", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def list_json(**kw):
    proc = run_cli("list", "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_name(listing, kind):
    return {c["name"]: c for c in listing["components"] if c["kind"] == kind}


# --------------------------------------------------------------------------- discovery


def test_installed_plugin_is_listed_with_distribution_name_and_version(installed):
    listing = list_json(path=installed["ok"], plugins="minidalle-fixture-good")
    solid = by_name(listing, "dataset")["fixture_solid"]
    assert (solid["provider"], solid["version"]) == ("minidalle-fixture-good", "0.3.1")
    assert solid["available"] and solid["summary"].startswith("fixture:")
    assert by_name(listing, "tokenizer")["fixture_chars"]["provider"] == "minidalle-fixture-good"
    assert by_name(listing, "attention")["full"]["provider"] == "minidalle"
    assert listing["failed_plugins"] == []

    text = run_cli("list", "dataset", path=installed["ok"], plugins="minidalle-fixture-good")
    assert text.returncode == 0, text.stderr
    line = next(l for l in text.stdout.splitlines() if "fixture_solid" in l)
    assert "minidalle-fixture-good 0.3.1" in line and "available" in line


def test_broken_plugins_are_reported_while_the_others_load(installed):
    listing = list_json(path=installed["ok"])
    assert "fixture_solid" in by_name(listing, "dataset")  # the good one still loads
    failures = {f["provider"]: f for f in listing["failed_plugins"]}
    assert set(failures) >= {"minidalle-fixture-broken", "minidalle-fixture-raising"}
    assert "import failed" in failures["minidalle-fixture-broken"]["error"]
    assert "libfoo" in failures["minidalle-fixture-broken"]["error"]
    assert "minidalle_codecs raised" in failures["minidalle-fixture-raising"]["error"]
    assert "cannot register its codec" in failures["minidalle-fixture-raising"]["error"]

    text = run_cli("list", path=installed["ok"])
    assert text.returncode == 0, text.stderr
    assert "Failed plugins:" in text.stdout
    assert "fixture_broken (minidalle-fixture-broken)" in text.stdout


def test_name_conflict_is_one_error_naming_both_providers(installed, tmp_path):
    # `list` still works and names the culprit; only what uses the name fails.
    proc = run_cli("list", path=installed["conflict"])
    assert proc.returncode == 0, proc.stderr
    assert "minidalle-fixture-conflict" in proc.stdout.split("Failed plugins:")[1]
    assert "attention 'full' is registered by two providers" in proc.stdout
    config = tmp_path / "c.toml"
    config.write_text('[model]\nattn_types = ["full"]\n')
    proc = run_cli("config", "show", str(config), path=installed["conflict"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith("attention 'full' is registered by two providers: "
                             "minidalle and minidalle-fixture-conflict 0.2.0"), lines[0]
    config.write_text('[model]\nattn_types = ["axial_row"]\n')
    assert run_cli("config", "show", str(config), path=installed["conflict"]).returncode == 0
    # Leaving the conflicting plugin out of autoloading gets the built-in back.
    assert run_cli("list", path=installed["conflict"], plugins="none").returncode == 0


@pytest.mark.parametrize("setting, loaded, not_loaded", [
    ("none", set(), {"minidalle-fixture-good", "minidalle-fixture-broken",
                     "minidalle-fixture-raising"}),
    ("0", set(), {"minidalle-fixture-good", "minidalle-fixture-broken"}),
    ("minidalle-fixture-good", {"minidalle-fixture-good"},  # by distribution name
     {"minidalle-fixture-broken", "minidalle-fixture-raising"}),
    ("fixture_raising, fixture_good", {"minidalle-fixture-good", "minidalle-fixture-raising"},
     {"minidalle-fixture-broken"}),  # by entry-point name, spaces allowed
    ("all", {"minidalle-fixture-good", "minidalle-fixture-broken", "minidalle-fixture-raising"},
     set()),
])
def test_minidalle_plugins_limits_autoloading(installed, setting, loaded, not_loaded):
    listing = list_json(path=installed["ok"], plugins=setting)
    seen = {c["provider"] for c in listing["components"]}
    seen |= {f["provider"] for f in listing["failed_plugins"]}
    assert loaded <= seen
    assert not (not_loaded & seen)
    # Built-ins always load.
    assert {"full", "axial_row", "axial_col", "conv_like"} <= set(by_name(listing, "attention"))


def test_third_party_config_class_validates_its_section(installed, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[dataset]\nname = "fixture_solid"\nsize = 0\n')
    proc = run_cli("config", "show", str(config), path=installed["ok"],
                   plugins="minidalle-fixture-good")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "dataset.size" in proc.stderr, proc.stderr

    config.write_text('[dataset]\nname = "fixture_solidd"\n')
    proc = run_cli("config", "show", str(config), path=installed["ok"],
                   plugins="minidalle-fixture-good")
    assert proc.returncode == 2
    assert "did you mean 'fixture_solid'" in proc.stderr, proc.stderr

    config.write_text('[dataset]\nname = "fixture_solid"\nsize = 3\n')
    proc = run_cli("config", "show", str(config), path=installed["ok"],
                   plugins="minidalle-fixture-good")
    assert proc.returncode == 0, proc.stderr
    assert 'name = "fixture_solid"' in proc.stdout and "size = 3" in proc.stdout


def test_installed_plugin_component_builds(installed):
    code = (
        "from minidalle.plugin.discovery import get_registry\n"
        "reg = get_registry()\n"
        "ds = reg.build('dataset', 'fixture_solid', {'size': 4}, image_size=8)\n"
        "item = ds[1]\n"
        "print(len(ds), item['caption'], tuple(item['image'].shape), item['image'].dtype)\n"
        "tok = reg.build('tokenizer', 'fixture_chars')\n"
        "print(tok.decode(tok.encode(['hi'], 5)[0]))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(installed["ok"]), os.environ.get("PYTHONPATH")])), MINIDALLE_PLUGINS="fixture_good")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["4 a green square (3, 8, 8) torch.uint8", "hi"]


# --------------------------------------------------------------------------- registry


def test_unknown_name_lists_close_matches():
    registry = load_registry(autoload="none")
    with pytest.raises(UnknownComponentError) as err:
        registry.get("attention", "axial_rwo")
    msg = str(err.value)
    assert "unknown attention 'axial_rwo'" in msg
    assert "did you mean 'axial_row'" in msg
    assert "minidalle list attention" in msg
    with pytest.raises(UnknownComponentError, match="known: .*full"):
        registry.get("attention", "zzzz")
    with pytest.raises(UnknownComponentError, match="unknown component kind 'widget'"):
        registry.get("widget", "full")


def test_unknown_name_from_the_cli_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[model]\nattn_types = ["ful"]\n')
    proc = run_cli("config", "show", str(config), plugins="none")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "model.attn_types[0]" in lines[0] and "did you mean 'full'" in lines[0]
    assert str(config) in lines[0]


def test_extra_plugin_object_and_duplicate_within_one_registry():
    import types

    from minidalle import hookimpl
    from minidalle.errors import DuplicateComponentError

    mod = types.ModuleType("local_plugin")

    @hookimpl
    def minidalle_rerankers(register):
        register("local_rank", lambda: "built", summary="a local reranker")

    mod.minidalle_rerankers = minidalle_rerankers
    registry = load_registry(autoload="none", extra_plugins=(mod,))
    component = registry.get("reranker", "local_rank")
    assert component.provider == "local_plugin"
    assert component.build() == "built"

    dup = types.ModuleType("dup_plugin")

    @hookimpl
    def minidalle_datasets(register):
        register("shapes", "x:y", summary="again")

    dup.minidalle_datasets = minidalle_datasets
    registry = load_registry(autoload="none", extra_plugins=(dup,))
    with pytest.raises(DuplicateComponentError,
                       match="dataset 'shapes' is registered by two providers: minidalle and dup_plugin"):
        registry.get("dataset", "shapes")
    assert registry.get("dataset", "folder").provider == "minidalle"  # the rest still work
    assert any("dup_plugin" in f.error for f in registry.failures)


def test_every_kind_has_a_hook_and_builtins():
    from minidalle.plugin import hookspecs

    assert set(hookspecs.KINDS) >= {"tokenizer", "codec", "attention", "dataset", "backend"}
    registry = load_registry(autoload="none")
    for kind in ("tokenizer", "codec", "attention", "dataset", "backend"):
        assert registry.names(kind), kind
        assert all(c.provider == "minidalle" for c in registry.components(kind))
        assert getattr(hookspecs, hookspecs.HOOKS[kind]).__doc__


def test_minidalle_testing_has_a_check_per_kind():
    """The conformance kit entry point: one check per kind, importable from
    `minidalle.testing`, without importing torch until a check is used."""
    code = (
        "import sys, minidalle.testing as t\n"
        "assert 'torch' not in sys.modules, 'importing minidalle.testing imported torch'\n"
        "names = [n for n in ('check_tokenizer', 'check_codec', 'check_attention',"
        " 'check_dataset', 'check_backend') if callable(getattr(t, n))]\n"
        "print(','.join(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "check_tokenizer,check_codec,check_attention,check_dataset,check_backend"


# --------------------------------------------------------------------------- laziness


def test_list_imports_no_heavy_module(installed):
    """`minidalle list` with every plugin loaded (the installed examples and the fixtures)
    must not import torch or any optional heavy package."""
    code = (
        "import contextlib, io, json, sys\n"
        "from minidalle.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['list', '--json'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(installed["ok"]), os.environ.get("PYTHONPATH")])))
    env.pop("MINIDALLE_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}
