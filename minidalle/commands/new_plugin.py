"""`minidalle new-plugin KIND NAME [--dir DIR]`: write a working plugin skeleton.

The skeleton is a separate distribution: ``pyproject.toml`` with the ``minidalle`` entry
point, ``src/minidalle_NAME/`` with the light registration hook and the component (its
attrs config class and factory), a README and a pytest that runs minidalle's conformance
check for the kind. Templates live in ``minidalle/templates/plugin/``.
"""
from __future__ import annotations

import re

KINDS_INFO = {
    "tokenizer": ("one id per UTF-8 byte (a starting point for your tokenizer)",
                  '[tokenizer]\nname = "{name}"\nlowercase = true'),
    "codec": ("a colour palette per grid cell (a starting point for your codec)",
              '[codec]\nname = "{name}"\nimage_size = 64\nfmap_size = 8\nlevels = 4'),
    "attention": ("image tokens see all text and the image rows just above",
                  '[model]\nattn_types = ["{name}", "full"]\n\n[attention.{name}]\nrows = 2'),
    "dataset": ("solid-colour squares (a starting point for your dataset)",
                '[dataset]\nname = "{name}"\nsize = 64'),
    "backend": ("eager PyTorch on any torch device",
                '[backend]\nname = "{name}"\ndevice = "cpu"\nprecision = "fp32"'),
    "reranker": ("scores (caption, image) pairs to sort generated images",
                 '[reranker]\nname = "{name}"\nweight = 1.0'),
}
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def add_parser(sub):
    p = sub.add_parser(
        "new-plugin", help="write a working plugin skeleton (package, entry point, test)",
        description="Write a plugin distribution for one component: pyproject.toml with the "
                    "minidalle entry point, a src/ package with the component and its config "
                    "class, a README and a pytest running minidalle's conformance check.")
    p.add_argument("kind", choices=sorted(KINDS_INFO), help="component kind")
    p.add_argument("name", help="component name (lower case, digits, _), e.g. sliding")
    p.add_argument("--dir", dest="directory", default=None,
                   help="directory to create (default: ./minidalle-NAME); must not exist "
                        "or be empty")
    p.set_defaults(func=run)


def names_for(name: str) -> dict[str, str]:
    return {
        "name": name,
        "dist": "minidalle-" + name.replace("_", "-"),
        "package": "minidalle_" + name,
        "Class": "".join(part.capitalize() for part in name.split("_") if part),
    }


def render(text: str, values: dict[str, str], where: str) -> str:
    def sub(match):
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template {where}: unknown placeholder {{{{{key}}}}}")
        return values[key]

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def plugin_files(kind: str, name: str) -> dict[str, str]:
    """Relative path -> content of the skeleton for ``kind``/``name``."""
    from importlib import resources

    from minidalle import __version__
    from minidalle.plugin.hookspecs import HOOKS

    summary, usage = KINDS_INFO[kind]
    values = names_for(name)
    values.update(kind=kind, module=kind, hook=HOOKS[kind], summary=summary,
                  usage=usage.format(name=name), minidalle_version=__version__)
    root = resources.files("minidalle") / "templates" / "plugin"

    def load(rel: str) -> str:
        return render((root / rel).read_text(encoding="utf-8"), values, rel)

    pkg = values["package"]
    return {
        "pyproject.toml": load("pyproject.toml.tmpl"),
        "README.md": load("README.md.tmpl"),
        f"src/{pkg}/__init__.py": load("__init__.py.tmpl"),
        f"src/{pkg}/{kind}.py": load(f"kinds/{kind}.py.tmpl"),
        f"tests/test_{pkg}.py": load("test_common.py.tmpl") + load(f"kinds/test_{kind}.py.tmpl"),
    }


def create(kind: str, name: str, directory=None):
    """Write the skeleton; returns the directory. Nothing is written on error."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from minidalle.errors import MinidalleError
    from minidalle.plugin.discovery import load_registry

    if kind not in KINDS_INFO:
        raise MinidalleError(f"new-plugin: unknown kind {kind!r} (kinds: {', '.join(sorted(KINDS_INFO))})")
    if not NAME_RE.match(name):
        raise MinidalleError(f"new-plugin: name {name!r}: expected lower-case letters, digits "
                             "and _, starting with a letter (at most 40 characters)")
    builtin = load_registry(autoload="none")
    if name in builtin.names(kind):
        raise MinidalleError(f"new-plugin: {kind} {name!r} is built into minidalle; a plugin "
                             "with the same name would conflict: choose another name")
    dest = Path(directory if directory is not None else names_for(name)["dist"])
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise MinidalleError(f"new-plugin: {dest} already exists; refusing to overwrite it "
                             "(choose another --dir)")
    files = plugin_files(kind, name)
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise MinidalleError(f"new-plugin: {parent}: no such directory")
    # Write everything in a sibling temp directory, then move it into place in one step.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); fails rather than lose anything
        os.rename(tmp, dest)
    except OSError as exc:
        raise MinidalleError(f"new-plugin: cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def run(args) -> int:
    info = names_for(args.name)
    dest = create(args.kind, args.name, args.directory)
    print(f"wrote {args.kind} plugin {info['dist']} in {dest}/")
    print(f"  src/{info['package']}/{args.kind}.py     the component: edit it")
    print(f"  tests/test_{info['package']}.py  runs minidalle's conformance check")
    print("next:")
    print(f"  pip install --no-deps -e {dest}     # into the environment minidalle runs from")
    print(f"  minidalle list {args.kind}")
    print(f"  python -m pytest {dest}/tests")
    return 0
