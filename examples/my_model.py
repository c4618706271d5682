"""An entry point for ``model.name: external`` (examples/my_model.yaml): any function that returns an
nn.Module. This one builds a small fully convolutional network; like many segmentation models, it takes
normalised RGB (the config's model.mean / model.std, applied by the project), returns a dict and predicts
at half the input resolution: the project unwraps ``out`` and upsamples it to the input size."""
from torch import nn


class TinySegNet(nn.Module):
    def __init__(self, classes: int, width: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return {"out": self.classifier(self.features(x))}


def build(classes: int = 6, width: int = 16) -> nn.Module:
    """model.entry: examples.my_model:build, model.kwargs: {classes: 6, width: 16}."""
    return TinySegNet(classes, width)
