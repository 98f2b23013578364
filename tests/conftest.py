import os

import pytest

# Tests see only built-ins and the plugins they install themselves unless they opt in.
os.environ.setdefault("MINIDALLE_TEST", "1")


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test starts with a registry loaded from the current environment."""
    from minidalle.plugin.discovery import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one torch thread is as fast, and far faster on a busy machine
    (every op of a 2-thread pool waits for a descheduled thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
