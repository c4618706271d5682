"""Colour prediction PNGs and example panels (evaluation output)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from utils.atomic import named_write


def save_color(pred: np.ndarray, palette: np.ndarray, path: str) -> None:
    """Write an HxW id map as a palette PNG (ids readable back with PIL, colours from `palette`)."""
    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    im.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    with named_write(path):
        im.save(path)


# Panels: tiles narrower than this are enlarged (nearest, an integer factor) so that the titles fit
# at a legible size; a 97 px wide image is drawn at 194 px, a 41 px one at 205 px.
MIN_TILE_WIDTH = 192
GAP = 4                                   # white pixels between tiles
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOR = (0, 0, 0)
TITLES = ("image", "perturbation", "adversarial", "ground truth", "clean prediction", "attacked prediction")


def tile_scale(width: int) -> int:
    """The integer factor by which a panel enlarges tiles `width` pixels wide."""
    return max(1, -(-MIN_TILE_WIDTH // width))


def _font_scale(texts: Sequence[str], width: int) -> float:
    """The largest font scale (at most 0.8) at which every text fits into `width` pixels."""
    widest = max(cv2.getTextSize(t, FONT, 1.0, 1)[0][0] for t in texts)
    return min(0.8, (width - 6) / widest)


def _text_band(texts: Sequence[str], tile_w: int, scale: float, total_w: int) -> np.ndarray:
    """A white band with one centred text above each tile."""
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, 1)
    band = np.full((th + base + 8, total_w, 3), 255, np.uint8)
    for i, t in enumerate(texts):
        tw = cv2.getTextSize(t, FONT, scale, 1)[0][0]
        x = i * (tile_w + GAP) + (tile_w - tw) // 2
        cv2.putText(band, t, (x, 4 + th), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
    return band


def _legend(ids: Sequence[int], names: Sequence[str], palette: np.ndarray, scale: float, total_w: int,
            ignore: int) -> np.ndarray:
    """Rows of colour swatch + class name for `ids`, wrapped to `total_w`; white background."""
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, 1)
    sw, pad, line = th + base, 6, th + base + 8
    entries = []
    for c in ids:
        name = "ignore" if c == ignore else (names[c] if c < len(names) else f"class_{c}")
        entries.append((c, name, sw + 4 + cv2.getTextSize(name, FONT, scale, 1)[0][0]))
    rows, x = [[]], pad
    for e in entries:
        if x + e[2] > total_w - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x,) + e)
        x += e[2] + 3 * pad
    band = np.full((len(rows) * line + pad, total_w, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = pad + r * line
        for x, c, name, _ in row:
            band[y:y + sw, x:x + sw] = 128          # a grey frame keeps white swatches visible
            band[y + 1:y + sw - 1, x + 1:x + sw - 1] = palette[c]
            cv2.putText(band, name, (x + sw + 4, y + th), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
    return band


def example_panel(image, x_adv, clean_pred: np.ndarray, adv_pred: np.ndarray, label: np.ndarray,
                  palette: np.ndarray, names: Sequence[str] = (), ignore: int = 255) -> np.ndarray:
    """One row: image | perturbation (scaled to the full range) | adversarial image | ground truth |
    clean prediction | adversarial prediction, each with its title above ("perturbation x<f>": the
    factor f by which the perturbation was multiplied, around mid grey), and below the row a legend of
    the classes in the three id maps (swatch + name from `names`; "ignore" for `ignore`).
    HxWx3 uint8. Id maps at another resolution than the image (labels kept at their original size)
    are resized to it (nearest); tiles narrower than MIN_TILE_WIDTH are enlarged by ``tile_scale``."""
    img = image.detach().float().cpu().permute(1, 2, 0).numpy()
    h, w = img.shape[:2]
    label, clean_pred, adv_pred = (cv2.resize(a.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                                   if a.shape != (h, w) else a for a in (label, clean_pred, adv_pred))
    adv = x_adv.detach().float().cpu().permute(1, 2, 0).numpy()
    delta = adv - img
    peak = float(np.abs(delta).max())
    scale = max(peak, 1e-12)
    tiles = [img, 0.5 + 0.5 * delta / scale, adv] + [palette[p] / 255.0 for p in (label, clean_pred, adv_pred)]
    k = tile_scale(w)
    tiles = [np.repeat(np.repeat((t.clip(0, 1) * 255).round().astype(np.uint8), k, 0), k, 1) for t in tiles]
    tw, total = w * k, 6 * w * k + 5 * GAP
    row = np.full((h * k, total, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        row[:, i * (tw + GAP):i * (tw + GAP) + tw] = t
    titles = list(TITLES)
    titles[1] = f"perturbation x{0.5 / scale:.3g}" if peak > 0 else "perturbation (none)"
    fs = _font_scale(titles, tw)
    ids = sorted(set(np.unique(label).tolist()) | set(np.unique(clean_pred).tolist())
                 | set(np.unique(adv_pred).tolist()))
    return np.concatenate([_text_band(titles, tw, fs, total), row, _legend(ids, names, palette, fs, total, ignore)], 0)
