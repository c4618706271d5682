"""Hugging Face transformers models (``requirements-hf.txt``).

``save_tiny_segformer(folder, classes)`` writes a small randomly initialised SegFormer with
``save_pretrained`` (and its image processor's ``preprocessor_config.json``): a folder of the kind
``model.name: hf`` loads with ``model.hf_path`` (examples/hf_segformer.yaml). ``load(path)`` is the same
model through ``model.name: external``, as an entry point: any transformers model (or one you change
before returning it) can be evaluated this way.
"""
from torch import nn


def save_tiny_segformer(folder: str, classes: int = 6, seed: int = 0) -> None:
    """A SegFormer with 2 stages of hidden size 8 and 16, one layer each: seconds on a CPU."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor
    torch.manual_seed(seed)
    config = SegformerConfig(num_labels=classes, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                             hidden_sizes=[8, 16], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                             patch_sizes=[7, 3], strides=[4, 2], decoder_hidden_size=16)
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor().save_pretrained(folder)  # image_mean / image_std: the ImageNet values


def load(path: str) -> nn.Module:
    """model.entry: examples.hf_segformer:load, model.kwargs: {path: DIR}; normalisation from the config's
    model.mean / model.std (model.name: hf reads it from preprocessor_config.json instead)."""
    from transformers import AutoModelForSemanticSegmentation
    return AutoModelForSemanticSegmentation.from_pretrained(path, local_files_only=True, use_safetensors=True)
