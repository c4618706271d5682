"""FPD (Li et al., CVPR 2020) adapted to segmentation, "FPD-Seg" (mtl_fpd.md §B1, §B5).

One ELU ResNet backbone (stride 32) is run twice with the same weights:

1. pass 1 on the (noisy / adversarial) input x, with the parameter-free non-local denoise D after
   the stem and after layer1; an FPN (1x1 laterals, bilinear top-down adds, 3x3 smooth) and a
   linear transposed-conv decoder (x4) restore the image x_hat;
2. middle denoise: z = x_hat + (1/N) (X X^T) X, X the raw input (3 x N);
3. pass 2 on z (same D placements), then the bounded dense classifier:
   Dropout -> 1x1 conv -> s * tanh -> bilinear upsampling to the input size.

D(F) = F + (1/N) (F F^T) F is cubic in the activations and unnormalised; it is computed in fp32
with autocast disabled (it overflows half precision). ``denoise_normalize`` (off = faithful)
weights the positions by cosine similarity instead of raw dot products, which keeps it bounded.

Outputs: eval mode -> logits; training mode / ``outputs()`` -> {"out": logits, "restored": x_hat}
with x_hat mapped back to the [0,1] pixel space of the input (so the restoration loss and the
cycle step ``model(restored.detach())`` need no knowledge of the normalisation).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import SetupError

from .backbones.resnet import ResNet
from .drn_seg import crop_to
from .registry import register_model
from .segmentor import Segmentor, upsample


def nonlocal_term(f: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """(1/N) (F K^T) K for F [B,C,H,W] viewed as C x N (K = F, or F with unit-norm columns), in fp32.

    Per position p: (1/N) sum_q <k_p, k_q> f_q, computed through the C x C matrix (cost O(C^2 N)).
    """
    with torch.autocast(device_type=f.device.type, enabled=False):
        x = f.float().reshape(f.shape[0], f.shape[1], -1)
        k = F.normalize(x, dim=1) if normalize else x
        term = torch.bmm(torch.bmm(x, k.transpose(1, 2)), k) / x.shape[-1]
    return term.reshape(f.shape)


def denoise(f: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """The FPD inner denoise layer D(F) = F + nonlocal_term(F) (no parameters), in fp32."""
    return f.float() + nonlocal_term(f, normalize)


def _relu_to_elu(module: nn.Module) -> None:
    """FPD's ResNet uses ELU everywhere: swap every ReLU child for an ELU."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.ELU(inplace=True))
        else:
            _relu_to_elu(child)


class FPDSeg(Segmentor):
    """FPD-Seg; ``backbone.*`` (shared by both passes), ``lateral*``/``smooth``/``restore`` (restoration), ``cls``."""

    def __init__(self, classes: int, layers: int = 101, width: float = 1.0, fpn_width: int = 256,
                 dropout: float = 0.5, logit_scale: float = 1.0, middle_denoise: bool = True,
                 denoise_normalize: bool = False, mean=None, std=None):
        super().__init__(mean, std)
        self.backbone = ResNet(layers, deep_base=False, output_stride=32, width=width)
        _relu_to_elu(self.backbone)
        c2, c3, c4, c5 = self.backbone.channels
        self.lateral5 = nn.Conv2d(c5, fpn_width, 1)
        self.lateral4 = nn.Conv2d(c4, fpn_width, 1)
        self.lateral3 = nn.Conv2d(c3, fpn_width, 1)
        self.lateral2 = nn.Conv2d(c2, fpn_width, 1)
        self.smooth = nn.Conv2d(fpn_width, fpn_width, 3, padding=1)
        # linear (no BN / activation): stride-4 map -> full resolution, 3 channels, unbounded
        self.restore = nn.Sequential(nn.ConvTranspose2d(fpn_width, 64, 2, 2), nn.ConvTranspose2d(64, 16, 2, 2),
                                     nn.ConvTranspose2d(16, 3, 1))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.cls = nn.Conv2d(c5, classes, 1)
        self.logit_scale = logit_scale
        self.middle_denoise = middle_denoise
        self.denoise_normalize = denoise_normalize

    def _pass(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """One backbone pass with D after the stem and after layer1; returns (c2, c3, c4, c5), c2 before D."""
        b = self.backbone
        c2 = b.layer1(denoise(b.layer0(x), self.denoise_normalize))
        c3 = b.layer2(denoise(c2, self.denoise_normalize))
        c4 = b.layer3(c3)
        return c2, c3, c4, b.layer4(c4)

    def restoration(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        c2, c3, c4, c5 = feats
        up = lambda a, ref: F.interpolate(a, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        p = self.lateral5(c5)
        p = up(p, c4) + self.lateral4(c4)
        p = up(p, c3) + self.lateral3(c3)
        p = up(p, c2) + self.lateral2(c2)
        return self.restore(self.smooth(p))

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        x_hat = crop_to(self.restoration(self._pass(x)), size)  # 4*ceil(H/4) on the input grid
        z = x_hat + nonlocal_term(x) if self.middle_denoise else x_hat
        d5 = self._pass(z)[3]
        logits = self.logit_scale * torch.tanh(self.cls(self.dropout(d5)))
        restored = x_hat * self.std + self.mean if self.normalized else x_hat
        return {"out": upsample(logits, size), "restored": restored}

    def phase1_parameters(self) -> Iterator[nn.Parameter]:
        """Everything but the classifier: what the restoration warm-up trains (mtl_fpd.md §B2)."""
        return (p for n, p in self.named_parameters() if not n.startswith("cls."))


@register_model("fpd_seg")
def build_fpd_seg(cfg) -> FPDSeg:
    m, f = cfg.model, cfg.model.fpd
    if m.layers not in (18, 34, 50, 101, 152):
        raise SetupError(f"config key model.layers must be 18, 34, 50, 101 or 152 for fpd_seg, got {m.layers}")
    if not 0 <= f.dropout < 1:
        raise SetupError(f"config key model.fpd.dropout must be in [0, 1), got {f.dropout}")
    return FPDSeg(cfg.data.classes, m.layers, m.width, f.fpn_width, f.dropout, f.logit_scale, f.middle_denoise,
                  f.denoise_normalize, m.mean, m.std)


__all__: List[str] = ["FPDSeg", "denoise", "nonlocal_term"]
