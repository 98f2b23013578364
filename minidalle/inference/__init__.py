"""minidalle.inference."""
