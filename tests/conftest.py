import os

import pytest

# Tests see only built-ins and the plugins they install themselves unless they opt in.
os.environ.setdefault("MINIDALLE_TEST", "1")


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test starts with a registry loaded from the current environment."""
    from minidalle.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()
