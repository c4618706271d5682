"""An mmsegmentation (1.x) model as an entry point for ``model.name: external`` (examples/mmseg_model.yaml).

mmsegmentation is not a dependency of this project: install it as its documentation says. ``init_model``
builds the model from its config file and loads its checkpoint (so test.py needs no test.checkpoint);
``mode="tensor"`` returns the decode head's logits, at a fraction of the input size (the project upsamples
them). mmsegmentation normalises in its data preprocessor, outside ``forward``: set model.mean / model.std
to its mean / std divided by 255 (the ImageNet values of most of its configs: the project's defaults).
"""
from torch import nn


class DecodeLogits(nn.Module):
    """An mmseg ``EncoderDecoder`` returning its logits for a batch of normalised RGB images."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x):
        return self.segmentor(x, mode="tensor")


def build(config: str, checkpoint: str, device: str = "cpu") -> nn.Module:
    """model.entry: examples.mmseg_model:build, model.kwargs: {config: FILE.py, checkpoint: FILE.pth}."""
    from mmseg.apis import init_model
    return DecodeLogits(init_model(config, checkpoint, device=device))
