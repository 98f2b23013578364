"""`minidalle new-plugin`: the skeletons it writes install, list and pass their own tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

from minidalle.cli import main
from minidalle.commands.new_plugin import KINDS_INFO, create, names_for
from minidalle.errors import MinidalleError
from minidalle.plugin.hookspecs import KINDS

INSTALLED_KINDS = ("attention", "dataset", "tokenizer")  # pip-installed into the venv


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def test_every_kind_has_a_template():
    assert set(KINDS_INFO) == set(KINDS)


def test_skeleton_layout(tmp_path):
    dest = create("codec", "pal_ette", tmp_path / "p")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "src/minidalle_pal_ette/__init__.py",
                     "src/minidalle_pal_ette/codec.py", "tests/test_minidalle_pal_ette.py"]
    meta = tomllib.loads((dest / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "minidalle-pal-ette"
    assert meta["project"]["entry-points"]["minidalle"] == {"pal_ette": "minidalle_pal_ette"}
    init = (dest / "src/minidalle_pal_ette/__init__.py").read_text()
    assert "def minidalle_codecs(register)" in init
    assert "import torch" not in init  # the entry-point module stays light
    assert "class PalEtteConfig" in (dest / "src/minidalle_pal_ette/codec.py").read_text()
    assert "{{" not in "".join(p.read_text() for p in dest.rglob("*") if p.is_file())


def test_refuses_to_overwrite_and_bad_names(tmp_path):
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(MinidalleError, match="already exists; refusing to overwrite"):
        create("dataset", "mine", existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "precious"
    with pytest.raises(MinidalleError, match="built into minidalle"):
        create("attention", "axial_row", tmp_path / "x")
    with pytest.raises(MinidalleError, match="expected lower-case letters"):
        create("attention", "My-Attn", tmp_path / "y")
    with pytest.raises(MinidalleError, match="no such directory"):
        create("attention", "ok", tmp_path / "missing" / "deeper")
    # nothing half-written was left behind, and an empty directory is fine to fill
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (create("tokenizer", "bytes2", empty) / "pyproject.toml").is_file()


def test_cli_one_line_errors_and_default_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["new-plugin", "dataset", "dots"]) == 0
    out = capsys.readouterr().out
    assert "minidalle-dots" in out and "pip install --no-deps -e" in out
    assert (tmp_path / "minidalle-dots" / "pyproject.toml").is_file()
    assert main(["new-plugin", "dataset", "dots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


def test_generated_plugins_install_list_and_pass_their_own_tests(tmp_path):
    """Every kind's skeleton passes its own test; three are pip-installed (editable) into
    this venv, found by `minidalle list` and uninstalled afterwards."""
    dirs = {kind: create(kind, f"gen_{kind}", tmp_path / f"gen_{kind}") for kind in KINDS}
    dists = [names_for(f"gen_{kind}")["dist"] for kind in INSTALLED_KINDS]
    installed = pip("install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                    *(str(dirs[k]) for k in INSTALLED_KINDS))
    try:
        assert installed.returncode == 0, installed.stderr
        env = dict(os.environ, MINIDALLE_PLUGINS=",".join(dists))
        proc = subprocess.run([sys.executable, "-m", "minidalle", "list", "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        listing = json.loads(proc.stdout)
        assert listing["failed_plugins"] == []
        rows = {(c["kind"], c["name"]): c for c in listing["components"]}
        for kind, dist in zip(INSTALLED_KINDS, dists):
            row = rows[(kind, f"gen_{kind}")]
            assert (row["provider"], row["version"], row["available"]) == (dist, "0.1.0", True)

        # The others run from their src/ directories, not installed.
        others = [str(dirs[k] / "src") for k in KINDS if k not in INSTALLED_KINDS]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(others + [os.environ.get("PYTHONPATH", "")]))
        env.pop("MINIDALLE_PLUGINS", None)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
             *(str(dirs[k] / "tests") for k in KINDS)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        # the listing test runs (not skipped) for the installed ones
        skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
        assert len(skipped) == len(KINDS) - len(INSTALLED_KINDS), proc.stdout
    finally:
        removed = pip("uninstall", "-y", *dists)
        assert removed.returncode == 0, removed.stderr
    from importlib.metadata import PackageNotFoundError, distribution

    for dist in dists:
        with pytest.raises(PackageNotFoundError):
            distribution(dist)
