"""minidalle.components."""
