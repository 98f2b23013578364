"""minidalle.recipes.quickstart."""
