"""SEA's published per-class weights for the balanced loss ``mask-ce-bal`` (sea.md §1.2).

Fixed global vectors, roughly inverse class frequency, each summing to 1: ``VOC`` (21 classes,
0 = background) and ``ADE20K`` (151 classes, label 0 "other" kept as a class, SEA's protocol).
They are data of the published attack, so SEA on VOC / ADE20K here is the published attack; other
datasets estimate 1/N_c from their training labels (``losses.class_weights_from_counts``).
"""
from __future__ import annotations

from typing import List, Optional

VOC = (
    0.0007, 0.0531, 0.1394, 0.0500, 0.0814, 0.0575, 0.0256,
    0.0312, 0.0198, 0.0626, 0.0382, 0.0457, 0.0212, 0.0404,
    0.0421, 0.0089, 0.0915, 0.0585, 0.0366, 0.0279, 0.0677,
)

ADE20K = (
    2.5511e-05, 3.6983e-05, 4.7570e-05, 6.6522e-05, 1.1128e-04, 1.0635e-04, 1.6683e-04, 1.7398e-04,
    2.2595e-04, 2.6104e-04, 3.4525e-04, 3.2680e-04, 4.6724e-04, 2.7333e-04, 3.8664e-04, 5.1101e-04,
    4.6147e-04, 2.8707e-04, 4.8777e-04, 5.6734e-04, 5.2263e-04, 5.7571e-04, 7.9284e-04, 7.1656e-04,
    9.8619e-04, 7.3393e-04, 6.0752e-04, 6.0696e-04, 1.0648e-03, 1.5916e-03, 7.4704e-04, 1.3956e-03,
    1.0427e-03, 1.6245e-03, 1.3812e-03, 1.2803e-03, 1.5659e-03, 2.3384e-03, 2.6498e-03, 2.1948e-03,
    1.9984e-03, 2.1434e-03, 2.2654e-03, 2.3339e-03, 2.6016e-03, 2.9368e-03, 2.4439e-03, 2.5844e-03,
    2.3346e-03, 1.0170e-03, 2.7078e-03, 3.7222e-03, 3.0739e-03, 3.0697e-03, 5.0181e-03, 4.7774e-03,
    2.0477e-03, 3.1477e-03, 2.8421e-03, 3.7206e-03, 2.5296e-03, 2.1699e-03, 2.8066e-03, 2.8080e-03,
    5.5795e-03, 4.0186e-03, 4.8758e-03, 3.5471e-03, 3.1513e-03, 3.0316e-03, 3.9002e-03, 5.0847e-03,
    4.8401e-03, 5.9311e-03, 5.3158e-03, 5.0188e-03, 4.0362e-03, 4.4585e-03, 5.2076e-03, 4.4833e-03,
    5.5491e-03, 5.7523e-03, 5.5545e-03, 8.7588e-03, 5.0301e-03, 5.4497e-03, 7.6726e-03, 5.1451e-03,
    7.9943e-03, 4.4696e-03, 7.4416e-03, 6.7389e-03, 7.8750e-03, 5.5496e-03, 1.2515e-02, 5.1635e-03,
    8.1806e-03, 9.9495e-03, 1.0522e-02, 6.0337e-03, 1.1848e-02, 1.0531e-02, 6.0837e-03, 8.0876e-03,
    1.1750e-02, 8.2409e-03, 6.8528e-03, 8.1382e-03, 8.7929e-03, 7.6437e-03, 5.7786e-03, 1.3009e-02,
    1.8844e-02, 1.0949e-02, 4.2059e-03, 5.7906e-03, 1.2998e-02, 1.4171e-02, 7.0287e-03, 9.0963e-03,
    1.0115e-02, 1.0510e-02, 1.3813e-02, 1.2319e-02, 1.4154e-02, 1.5693e-02, 1.5035e-02, 1.1120e-02,
    1.6888e-02, 7.3436e-03, 1.4521e-02, 9.3029e-03, 1.4782e-02, 1.1918e-02, 1.7509e-02, 2.0762e-02,
    1.4547e-02, 2.0312e-02, 1.0543e-02, 1.8876e-02, 3.6659e-02, 2.0046e-02, 2.2035e-02, 1.4011e-02,
    1.5645e-02, 1.1985e-02, 1.0001e-02, 2.7073e-02, 2.1668e-02, 1.8419e-02, 2.1877e-02,
)

PUBLISHED = {"voc2012": VOC, "ade20k": ADE20K}


def published_class_weights(dataset: str, classes: int) -> Optional[List[float]]:
    """SEA's weight vector for `dataset` with `classes` classes, or None if it has none.

    ADE20K with 150 classes (label 0 ignored, the mmseg convention) gets the 151-vector without
    class 0, renormalised: the relative weights of the other classes stay as published (only their
    ratios matter, as the attack steps by the sign of the gradient).
    """
    w = PUBLISHED.get(dataset)
    if w is None:
        return None
    if len(w) == classes:
        return list(w)
    if dataset == "ade20k" and classes == len(w) - 1:
        rest = w[1:]
        return [v / sum(rest) for v in rest]
    return None
