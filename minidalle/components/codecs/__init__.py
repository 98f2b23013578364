"""minidalle.components.codecs."""
