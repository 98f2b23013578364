"""minidalle.components.backends."""
