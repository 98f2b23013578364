"""minidalle.recipes."""
