"""What "equal up to float rounding" means in the tests (docs/reproducibility.md).

Another batch size, process count or CPU runs other kernels, which sum in another order: logits differ
by about 1e-6 and an iterative attack can carry that to a few pixels. Two evaluations of one checkpoint
agree up to rounding when their per-image counts (engine/eval_resume.saved_counts) differ at no more
than PIXEL_FRACTION of the labelled pixels and their mIoU by no more than MIOU. Measured on the test
model (PGD-3 on 16 images; batch 1 against 4, native AVX-512 kernels against ATEN_CPU_CAPABILITY=default
and avx2 and ONEDNN_MAX_CPU_ISA=AVX2, every pair): at most 3 of 21,981 pixels (1.4e-4) and 6e-4 mIoU
apart; the bounds are 14 and 16 times that.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

PIXEL_FRACTION = 0.002
MIOU = 0.01


def count_difference(a: Dict[str, Dict[str, np.ndarray]], b: Dict[str, Dict[str, np.ndarray]], run: str) -> float:
    """The fraction of labelled pixels whose hit / miss differs between two per-image count files for
    one run: the summed |intersection difference| over images and classes, over the labelled pixels."""
    assert np.array_equal(a[run]["index"], b[run]["index"]) and np.array_equal(a[run]["target"], b[run]["target"])
    return float(np.abs(a[run]["inter"].astype(np.int64) - b[run]["inter"]).sum() / max(int(a[run]["target"].sum()), 1))


def assert_agree_up_to_rounding(counts_a, counts_b, metrics_a: dict, metrics_b: dict) -> None:
    """Every run (clean and each attack) of two evaluations agrees up to rounding."""
    assert sorted(counts_a) == sorted(counts_b)
    for run in counts_a:
        assert count_difference(counts_a, counts_b, run) <= PIXEL_FRACTION, run
        ma = metrics_a["clean"] if run == "clean" else metrics_a["attacks"][run]
        mb = metrics_b["clean"] if run == "clean" else metrics_b["attacks"][run]
        assert abs(ma["mIoU"] - mb["mIoU"]) <= MIOU, (run, ma["mIoU"], mb["mIoU"])
