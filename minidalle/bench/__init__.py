"""minidalle.bench."""
