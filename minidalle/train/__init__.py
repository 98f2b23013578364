"""minidalle.train."""
