"""Conformance checks that plugin authors run on their components (one module per kind)."""
