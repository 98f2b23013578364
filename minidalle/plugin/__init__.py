"""minidalle.plugin."""
