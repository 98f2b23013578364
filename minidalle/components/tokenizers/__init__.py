"""minidalle.components.tokenizers."""
