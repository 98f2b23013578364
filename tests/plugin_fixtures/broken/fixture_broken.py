"""Fails at import time, like a plugin whose native dependency is missing."""
raise ImportError("fixture_broken needs libfoo, which is not installed")
