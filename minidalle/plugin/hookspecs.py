"""Plugin hooks: one per component kind.

Each hook is called once per plugin with a ``register`` callable::

    register(name, factory, *, config=ConfigClass, summary="one line", requires=("pkg",))

``factory`` builds the component; it may be the callable itself or a lazy
``"package.module:attribute"`` string, so that listing components never imports heavy code.
``config`` is the attrs class the component's TOML section is validated against (also
allowed as a lazy string). ``requires`` names importable Python modules the component needs;
when one is missing the component is listed as unavailable instead of failing.
"""
import pluggy

hookspec = pluggy.HookspecMarker("minidalle")


@hookspec
def minidalle_tokenizers(register):
    """Register text tokenizers: ``factory(config) -> Tokenizer``."""


@hookspec
def minidalle_codecs(register):
    """Register image codecs: ``factory(config) -> Codec``."""


@hookspec
def minidalle_attention(register):
    """Register attention variants: a pattern (mask) or a whole module."""


@hookspec
def minidalle_datasets(register):
    """Register datasets: ``factory(config, *, image_size, split, seed) -> Dataset``."""


@hookspec
def minidalle_backends(register):
    """Register device backends: ``factory(config) -> Backend``."""


@hookspec
def minidalle_rerankers(register):
    """Register rerankers that score (caption, image) pairs: ``factory(config) -> Reranker``."""


@hookspec
def minidalle_stages(register):
    """Register stages of ``minidalle run``::

        register(name, run, *, is_complete=None, outputs=None, clean=None, summary="",
                 parallel=False, requires=(), sections=None)

    ``run(ctx)``, ``is_complete(ctx) -> bool``, ``outputs(ctx) -> [Path]`` and
    ``clean(ctx)`` may be lazy ``"module:attr"`` strings; ``sections`` maps the config
    sections the stage owns (e.g. ``"codec_training"``) to the attrs class that validates
    each (also allowed as a lazy string)."""


@hookspec
def minidalle_commands(register):
    """Register subcommands of ``minidalle``: ``register(name, module, *, sections=None)``.

    ``module`` (a module or its dotted name) has ``add_parser(subparsers)``; it must import
    nothing heavy at module level. ``sections`` as for stages."""


#: kind name -> hook name (component kinds; stages and commands have their own hooks)
HOOKS = {
    "tokenizer": "minidalle_tokenizers",
    "codec": "minidalle_codecs",
    "attention": "minidalle_attention",
    "dataset": "minidalle_datasets",
    "backend": "minidalle_backends",
    "reranker": "minidalle_rerankers",
}
KINDS = tuple(HOOKS)
STAGE_HOOK = "minidalle_stages"
COMMAND_HOOK = "minidalle_commands"
