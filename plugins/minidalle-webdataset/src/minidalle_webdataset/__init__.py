"""minidalle plugin: the ``webdataset`` dataset.

This module is what the entry point loads, so it imports nothing heavy; the dataset itself
lives in :mod:`minidalle_webdataset.dataset` and is imported when a config builds it.
"""
from minidalle import hookimpl

__version__ = "0.1.0"


@hookimpl
def minidalle_datasets(register):
    register(
        "webdataset",
        "minidalle_webdataset.dataset:build",
        config="minidalle_webdataset.dataset:WebDatasetConfig",
        summary="(image, caption) pairs from WebDataset .tar shards (brace patterns)",
        requires=("braceexpand", "PIL"),
    )
