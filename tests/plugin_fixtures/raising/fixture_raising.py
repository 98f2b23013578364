from minidalle import hookimpl


@hookimpl
def minidalle_codecs(register):
    raise RuntimeError("fixture_raising cannot register its codec")
