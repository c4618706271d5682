"""Shared ground: config, registry, distributed helpers, checkpoints, logging, metrics.

Nothing in here imports from the packages above it (models, datasets, attacks, defenses, engine).
"""
