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


#: kind name -> hook name
HOOKS = {
    "tokenizer": "minidalle_tokenizers",
    "codec": "minidalle_codecs",
    "attention": "minidalle_attention",
    "dataset": "minidalle_datasets",
    "backend": "minidalle_backends",
    "reranker": "minidalle_rerankers",
}
KINDS = tuple(HOOKS)
