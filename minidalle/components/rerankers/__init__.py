"""minidalle.components.rerankers: built-in rerankers (likelihood, clip)."""
