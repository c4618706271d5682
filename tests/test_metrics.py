"""Metrics from per-image counts and the worst case over attacks: hand-computed cases and brute force."""
from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.metrics import (class_map, confusion_counts, image_accuracy, label_counts, miou, summarize,  # noqa: E402
                           worst_case, worst_case_miou)

IGN = 255


def test_confusion_counts_by_hand():
    # image 0: labels / predictions (3 classes, one ignored pixel whose prediction must not count)
    t0 = [[0, 0, 1], [1, 255, 2]]
    p0 = [[0, 1, 1], [2, 2, 2]]
    # image 1: class 2 absent from labels but predicted; class 1 absent from both
    t1 = [[0, 0, 0], [0, 0, 255]]
    p1 = [[0, 0, 2], [0, 0, 1]]
    inter, union, tgt = confusion_counts(torch.tensor([p0, p1]), torch.tensor([t0, t1]), 3, IGN)
    assert inter.dtype == torch.int64 and inter.shape == (2, 3)
    # image 0: I = [1 (pix0), 1 (pix2), 1 (pix5)]; T = [2,2,1]; P = [1,2,2] (ignored pred excluded)
    assert inter[0].tolist() == [1, 1, 1]
    assert tgt[0].tolist() == [2, 2, 1]
    assert union[0].tolist() == [2, 3, 2]
    # image 1: T = [5,0,0]; P = [4,0,1] (pred 1 at the ignored pixel dropped); I = [4,0,0]
    assert inter[1].tolist() == [4, 0, 0]
    assert tgt[1].tolist() == [5, 0, 0]
    assert union[1].tolist() == [5, 0, 1]


def test_prediction_of_an_extra_channel_counts_in_no_class():
    # Taskonomy: 18 output channels, 17 classes; channel 17 is no class. Labels / argmax of the scores:
    t = torch.tensor([[[16, 16, 0], [0, IGN, 16]]])
    p = torch.tensor([[[16, 17, 0], [17, 17, 16]]])
    scores = torch.nn.functional.one_hot(p, 18).permute(0, 3, 1, 2).float()  # [1,18,2,3]
    pred = class_map(scores)
    assert pred.tolist() == p.tolist()
    inter, union, tgt = confusion_counts(pred, t, 17, IGN)
    # class 16: hits at (0,0), (1,2); (0,1) predicted 17 is a miss -> I 2, T 3, predicted 2, U 3
    # class 0: hit at (0,2); (1,0) predicted 17 is a miss -> I 1, T 2, predicted 1, U 2
    assert inter[0, 16].item() == 2 and tgt[0, 16].item() == 3 and union[0, 16].item() == 3
    assert inter[0, 0].item() == 1 and tgt[0, 0].item() == 2 and union[0, 0].item() == 2
    assert inter.sum().item() == 3 and tgt.sum().item() == 5 and union.sum().item() == 5
    s = summarize(inter, union, tgt)
    assert s["iou_per_class"][16] == pytest.approx(2 / 3) and s["iou_per_class"][0] == pytest.approx(1 / 2)
    assert s["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["aAcc"] == pytest.approx(3 / 5)


def test_summarize_absent_classes_and_ignore():
    # pooled over the two images above: I = [5,1,1], T = [7,2,1], U = [7,3,3]; plus a 4th class absent from both
    inter = np.array([[1, 1, 1, 0], [4, 0, 0, 0]])
    union = np.array([[2, 3, 2, 0], [5, 0, 1, 0]])
    tgt = np.array([[2, 2, 1, 0], [5, 0, 0, 0]])
    s = summarize(inter, union, tgt, names=["a", "b", "c", "d"])
    assert s["iou_per_class"][:3] == pytest.approx([5 / 7, 1 / 3, 1 / 3]) and s["iou_per_class"][3] is None
    assert s["mIoU"] == pytest.approx((5 / 7 + 1 / 3 + 1 / 3) / 3)
    assert s["acc_per_class"][:3] == pytest.approx([5 / 7, 1 / 2, 1.0]) and s["acc_per_class"][3] is None
    assert s["mAcc"] == pytest.approx((5 / 7 + 1 / 2 + 1) / 3)
    assert s["aAcc"] == pytest.approx(7 / 10)
    # per image: image 0 mIoU = (1/2 + 1/3 + 1/2)/3, image 1 = (4/5 + 0)/2 (class 2 predicted, union 1)
    img = [(1 / 2 + 1 / 3 + 1 / 2) / 3, (4 / 5 + 0) / 2]
    assert s["mIoU_img"] == pytest.approx(np.mean(img))
    assert s["aAcc_img"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert s["names"] == ["a", "b", "c", "d"] and s["images"] == 2


def test_counts_match_plain_loops():
    g = torch.Generator().manual_seed(0)
    C = 5
    t = torch.randint(0, C, (3, 7, 9), generator=g)
    t[torch.rand(t.shape, generator=g) < 0.2] = IGN
    p = torch.randint(0, C, (3, 7, 9), generator=g)
    inter, union, tgt = confusion_counts(p, t, C, IGN)
    for b in range(3):
        for c in range(C):
            v = t[b] != IGN
            i = ((p[b] == c) & (t[b] == c) & v).sum().item()
            tt = ((t[b] == c) & v).sum().item()
            pp = ((p[b] == c) & v).sum().item()
            assert (inter[b, c].item(), tgt[b, c].item(), union[b, c].item()) == (i, tt, pp + tt - i)
    assert label_counts(t, C, IGN).tolist() == [int(((t == c)).sum()) for c in range(C)]


def test_image_accuracy_nan_without_valid_pixels():
    acc = image_accuracy(np.array([[2, 0], [0, 0]]), np.array([[3, 1], [0, 0]]))
    assert acc[0] == pytest.approx(0.5) and np.isnan(acc[1])


def _random_case(rng, A=3, N=6, C=3, size=12):
    """Per-attack per-image counts from random label/prediction maps (tiny)."""
    t = torch.as_tensor(rng.integers(0, C, (N, size)))
    I, U = [], []
    for _ in range(A):
        p = t.clone()
        flip = torch.as_tensor(rng.random((N, size)) < rng.uniform(0.1, 0.7))
        p[flip] = torch.as_tensor(rng.integers(0, C, int(flip.sum())))
        i, u, tg = confusion_counts(p, t, C, IGN)
        I.append(i.numpy()), U.append(u.numpy())
    return np.stack(I), np.stack(U), tg.numpy()


def _brute(I, U):
    A, N, _ = I.shape
    best = np.inf
    rows = np.arange(N)
    for sel in itertools.product(range(A), repeat=N):
        s = np.array(sel)
        best = min(best, float(miou(I[s, rows].sum(0), U[s, rows].sum(0))))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_worst_case_miou_bounds_and_local_optimum(seed):
    """What the search guarantees: <= every single attack, >= the global (brute-force) minimum, and no
    single-image swap improves it. (Global optimality is not guaranteed: mIoU is a sum of ratios.)"""
    rng = np.random.default_rng(seed)
    I, U, _ = _random_case(rng)
    val, sel, _ = worst_case_miou(I, U)
    rows = np.arange(I.shape[1])
    assert val == pytest.approx(float(miou(I[sel, rows].sum(0), U[sel, rows].sum(0))))
    singles = miou(I.sum(1), U.sum(1))
    assert val <= singles.min() + 1e-12
    assert val >= _brute(I, U) - 1e-12
    for n in range(I.shape[1]):
        for a in range(I.shape[0]):
            s = sel.copy()
            s[n] = a
            assert float(miou(I[s, rows].sum(0), U[s, rows].sum(0))) >= val - 1e-12


def test_worst_case_miou_is_global_for_disjoint_classes():
    """Images with disjoint class sets make mIoU separable per image: the local search must hit the
    brute-force optimum."""
    rng = np.random.default_rng(3)
    A, N, C = 3, 6, 12
    I = np.zeros((A, N, C), np.int64)
    U = np.zeros((A, N, C), np.int64)
    for n in range(N):
        cls = [2 * n, 2 * n + 1]
        for a in range(A):
            tgt = rng.integers(3, 10, 2)
            inter = np.minimum(tgt, rng.integers(0, 10, 2))
            I[a, n, cls] = inter
            U[a, n, cls] = tgt + rng.integers(0, 4, 2)   # predicted-only pixels stay within the image's classes
    val, _, _ = worst_case_miou(I, U)
    assert val == pytest.approx(_brute(I, U), abs=1e-12)


def test_worst_case_dict_by_hand():
    # 2 attacks, 2 images, 2 classes; per-image accuracies: attack 0 = [1/2, 1], attack 1 = [1, 0]
    T = np.array([[2, 0], [0, 2]])
    I = np.array([[[1, 0], [0, 2]], [[2, 0], [0, 0]]])
    U = np.array([[[2, 1], [0, 2]], [[2, 0], [2, 2]]])
    r = worst_case(I, U, T, labels=["x", "y"])
    assert r["aAcc"] == pytest.approx((0.5 + 0.0) / 2)
    # per-image mIoU: attack 0 = [(1/2+0)/2, 1], attack 1 = [1, (0+0)/2]
    assert r["mIoU_img"] == pytest.approx((0.25 + 0.0) / 2)
    rows = np.arange(2)
    best = min(float(miou(I[list(s), rows].sum(0), U[list(s), rows].sum(0)))
               for s in itertools.product(range(2), repeat=2))
    assert r["mIoU"] == pytest.approx(best)
    assert r["chosen"]["mIoU"] == pytest.approx(r["mIoU"])
    assert [p["mIoU"] for p in r["per_attack"]] == pytest.approx([(1 / 2 + 2 / 3) / 2, (2 / 4 + 0 / 2) / 2])
    assert r["labels"] == ["x", "y"]


def test_worst_case_single_attack_is_identity():
    rng = np.random.default_rng(1)
    I, U, T = _random_case(rng, A=1)
    r = worst_case(I, U, T)
    s = summarize(I[0], U[0], T)
    assert r["mIoU"] == pytest.approx(s["mIoU"]) and r["aAcc"] == pytest.approx(s["aAcc_img"])
    assert r["moves"] == 0


def test_regression_sums_and_pooled_errors_by_hand():
    from utils.metrics import regression_sums, summarize_regression
    out = torch.zeros(2, 2, 2, 2)
    target = torch.zeros(2, 2, 2, 2)
    target[0, 0, 0, 0], target[0, 1, 1, 1] = 2.0, -1.0     # image 0: errors 2 and 1 (both valid)
    target[1, :, 0, 0] = 4.0                               # image 1: errors 4, 4 at a masked pixel
    mask = torch.ones(2, 1, 2, 2)
    mask[1, 0, 0, 0] = 0
    s = regression_sums(out, target, mask)
    assert s.dtype == torch.float64
    assert s.tolist() == [[3.0, 5.0, 8.0], [0.0, 0.0, 6.0]]   # (sum|e|, sum e^2, valid elements = pixels x channels)
    m = summarize_regression(s)
    assert m == {"mae": 3 / 14, "mse": 5 / 14, "rmse": (5 / 14) ** 0.5, "elements": 14}
    assert regression_sums(out, target).tolist()[1] == [8.0, 32.0, 8.0]   # no mask: every element
    assert summarize_regression(torch.zeros(0, 3))["elements"] == 0
