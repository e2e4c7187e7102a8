"""The KAN model: bases, swappable edge sources, layers and model kinds."""
