"""Backbones return a list of feature maps, shallow to deep."""
