"""Registration module: imports nothing heavy, points at the implementation lazily."""
from minidalle import hookimpl


@hookimpl
def minidalle_datasets(register):
    register("fixture_solid", "fixture_good_impl:build_dataset",
             config="fixture_good_impl:SolidConfig",
             summary="fixture: solid-colour images captioned with their colour")


@hookimpl
def minidalle_tokenizers(register):
    register("fixture_chars", "fixture_good_impl:build_tokenizer",
             summary="fixture: one id per character")
