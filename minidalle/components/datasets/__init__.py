"""minidalle.components.datasets."""
