from minidalle import hookimpl


@hookimpl
def minidalle_attention(register):
    register("full", "fixture_conflict:build", summary="fixture: shadows the built-in 'full'")
