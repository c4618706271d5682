"""A dataset read from a list file of ``image label`` paths relative to a root (semseg / VOC layout)."""
from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import SetupError
from utils.textfile import read_utf8


def is_complete(data: bytes) -> bool:
    """False for a JPEG or PNG file that was cut short (``cv2.imread`` returns the decoded part of a
    truncated JPEG with only a libjpeg warning on stderr). Other formats are left to the decoder."""
    if data[:2] == b"\xff\xd8":  # JPEG: an end-of-image marker after the last start-of-scan marker
        sos = data.rfind(b"\xff\xda")  # (entropy-coded data never holds 0xFF followed by 0xDA or 0xD9)
        return sos >= 0 and data.find(b"\xff\xd9", sos + 2) >= 0
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: the empty IEND chunk with its CRC
        end = data.rfind(b"\x00\x00\x00\x00IEND")
        return end >= 0 and len(data) >= end + 12
    return True


# libjpeg reports damaged entropy-coded data only as a warning on stderr and decodes the rest as
# garbage (JWRN_* messages of jerror.h: "Corrupt JPEG data: ...", "Premature end of JPEG file", ...);
# its other warnings (an unknown JFIF revision, odd SOS parameters of a baseline file) leave the
# pixels intact and are passed on
_JPEG_CORRUPT = re.compile(r"Corrupt JPEG data[^\n]*|Premature end of JPEG file|Inconsistent progression sequence[^\n]*")
_capture = threading.Lock()
_capture_file: dict = {}  # pid -> temporary file that receives fd 2 during a JPEG decode


def _imdecode_with_warnings(buf: np.ndarray, flags: int) -> Tuple[Optional[np.ndarray], str]:
    """``cv2.imdecode`` with file descriptor 2 redirected, so the decoder's warnings can be read;
    whatever else went to stderr meanwhile is passed on."""
    with _capture:
        f = _capture_file.get(os.getpid())
        if f is None:  # one per process: DataLoader workers must not share a file offset with their parent
            f = _capture_file[os.getpid()] = tempfile.TemporaryFile()
        sys.stderr.flush()
        saved = os.dup(2)
        f.seek(0)
        f.truncate()
        os.dup2(f.fileno(), 2)
        try:
            img = cv2.imdecode(buf, flags)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode("utf-8", "replace")
    return img, text


def _check_pixels(data: bytes, path: str) -> None:
    """Refuse a header that claims more pixels than PIL's decompression-bomb limit (a few bytes of PNG
    can claim 60000x60000, i.e. gigabytes once decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)):
                pass
    except Image.DecompressionBombError as e:
        raise SetupError(f"cannot read image {path}: {_bomb_text(e)}") from None
    except (OSError, ValueError, SyntaxError):  # not an image PIL knows: left to the decoder
        pass


def _bomb_text(e: Exception) -> str:
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    return (f"its header claims {found.group(1)} pixels, more than the limit of {found.group(2)} "
            f"(a decompression bomb?)" if found else "too many pixels (a decompression bomb?)")


def decode_image(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """cv2 decoding of a whole file (same pixels as ``cv2.imread(path, flags)`` with the EXIF
    orientation ignored), refusing files that are missing, truncated, corrupt (any libjpeg warning of
    corrupt data), not images, or claim more pixels than PIL's decompression-bomb limit, with a
    SetupError naming the file.

    The EXIF orientation is ignored because labels (PNG) carry none: applied to the image only, a
    rotated JPEG would no longer line up with its label.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SetupError(f"cannot read image {path}: file not found") from None
    except OSError as e:
        raise SetupError(f"cannot read image {path}: {e.strerror or e}") from None
    if not is_complete(data):
        raise SetupError(f"cannot read image {path}: the file is truncated")
    _check_pixels(data, path)
    if flags >= 0:  # IMREAD_UNCHANGED (-1) never applies the orientation, and takes no other flag
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    buf = np.frombuffer(data, np.uint8)
    if data[:2] == b"\xff\xd8":
        img, messages = _imdecode_with_warnings(buf, flags)
        corrupt = _JPEG_CORRUPT.search(messages)
        others = _JPEG_CORRUPT.sub("", messages).strip()
        if others:
            print(others, file=sys.stderr)
        if corrupt:
            raise SetupError(f"cannot read image {path}: {corrupt.group(0).strip()}")
    else:
        img = cv2.imdecode(buf, flags)
    if img is None:
        raise SetupError(f"cannot read image {path}: not a readable image")
    return img


def read_image(path: str) -> np.ndarray:
    """RGB float32 HxWx3 in [0,1]; SetupError naming the file if unreadable or truncated."""
    return cv2.cvtColor(decode_image(path), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def read_label(path: str) -> np.ndarray:
    """Label ids HxW int64. PIL returns palette indices for 'P' PNGs (VOC), not luminance; a truncated
    file is an error (PIL refuses to fill it in unless told to)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise SetupError(f"label {path} has mode {im.mode}; expected a single-channel or palette PNG")
            return np.array(im).astype(np.int64)
    except Image.DecompressionBombError as e:
        raise SetupError(f"cannot read label {path}: {_bomb_text(e)}") from None
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot read label {path}: {e}") from None


def read_list(root: str, list_file: str) -> List[Tuple[str, Optional[str]]]:
    """Parse a list file; each line `image [label]`, paths relative to root (a leading '/' is tolerated)."""
    path = list_file if os.path.isabs(list_file) and os.path.isfile(list_file) else os.path.join(root, list_file)
    if not os.path.isdir(root):
        raise SetupError(f"data root not found: {root}")
    if not os.path.isfile(path):
        raise SetupError(f"list file not found: {path}")
    items = []
    for n, line in enumerate(read_utf8(path, "list file").split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise SetupError(f"{path}:{n}: expected 'image [label]', got {line.strip()!r}")
        img, lbl = (os.path.join(root, p.lstrip("/")) for p in (parts + [""])[:2])
        items.append((img, lbl if len(parts) == 2 else None))
    if not items:
        raise SetupError(f"list file {path} is empty")
    return items


def header_size(path: str):
    """(width, height) from the file header; SetupError naming the file if it is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as e:
        raise SetupError(f"cannot read image {path}: {_bomb_text(e)}") from None
    except OSError:
        raise SetupError(f"cannot read image {path}: not a readable image") from None


def check_items(items: List[Tuple[str, Optional[str]]], source: str) -> List[Tuple[str, Optional[str]]]:
    """Fail early, naming the file, when `items` is empty, an image or its label is missing or not an
    image, or a label's size differs from its image's (read from the file headers only, so cheap)."""
    if not items:
        raise SetupError(f"{source}: no samples found")
    for img, lbl in items:
        if not os.path.isfile(img):
            raise SetupError(f"{source}: image {img} not found")
        if lbl is None:
            continue
        if not os.path.isfile(lbl):
            raise SetupError(f"{source}: image {img} has no label (expected {lbl})")
        sa, sb = header_size(img), header_size(lbl)
        if sa != sb:
            raise SetupError(f"label {lbl} is {sb[0]}x{sb[1]} but its image {img} is {sa[0]}x{sa[1]}")
    return items


def split_list(data_cfg, split: str) -> str:
    """The list file configured for `split` ('' = none, scan the folder layout)."""
    return {"train": data_cfg.train_list, "val": data_cfg.val_list, "test": data_cfg.test_list}[split]


class SegDataset(Dataset):
    """(image, label) pairs; yields {"image": [3,H,W] float in [0,1], "label": [H,W] long, "index": i}.

    `transform(img, lbl, rng)` gets a generator seeded from (seed, epoch, index): call
    ``set_epoch`` each epoch so augmentation differs between epochs but repeats between runs.
    """

    def __init__(self, items: List[Tuple[str, Optional[str]]], classes: int, ignore_label: int = 255,
                 transform: Optional[Callable] = None, seed: int = 0, label_map: Optional[Callable] = None):
        self.items, self.classes, self.ignore_label = items, classes, ignore_label
        self.transform, self.seed, self.epoch, self.label_map = transform, seed, 0, label_map

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def name(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self.items[index][0]))[0]

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self.items[index]
        img = read_image(img_path)
        if lbl_path is None:
            return img, np.full(img.shape[:2], self.ignore_label, np.int64)
        lbl = read_label(lbl_path)
        if self.label_map is not None:
            lbl = self.label_map(lbl)
        if lbl.shape != img.shape[:2]:
            raise SetupError(f"label {lbl_path} is {lbl.shape[1]}x{lbl.shape[0]} but its image "
                             f"{img_path} is {img.shape[1]}x{img.shape[0]}")
        bad = (lbl >= self.classes) & (lbl != self.ignore_label) | (lbl < 0)
        if bad.any():
            raise SetupError(f"label {lbl_path} has values {sorted(np.unique(lbl[bad]).tolist())[:5]} "
                             f"outside 0..{self.classes - 1} and not {self.ignore_label}")
        return img, lbl

    def __getitem__(self, index: int) -> dict:
        img, lbl = self.load(index)
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            img, lbl = self.transform(img, lbl, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "label": torch.from_numpy(np.ascontiguousarray(lbl)).long(), "index": index}
