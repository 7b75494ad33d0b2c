"""Metrics against hand-computed values."""
import math

import numpy as np
import pytest

from mdm_kernels.train.metrics import format_table, pearson, sentiment_metrics, weighted_f1


def test_hand_computed():
    label = np.array([-2.6, -0.4, 0.0, 0.0, 1.2, 2.0, 3.4, -1.0])
    pred = np.array([-2.0, 0.3, -0.2, 0.0, 1.6, 0.4, 2.6, -1.4])
    m = sentiment_metrics(pred, label)
    # round(clip): label -> [-3,-0,0,0,1,2,3,-1], pred -> [-2,0,-0,0,2,0,3,-1]
    # idx: 0 -3/-2 no; 1 -0/0 yes; 2 0/-0 yes; 3 yes; 4 1/2 no; 5 2/0 no; 6 3/3 yes; 7 -1/-1 yes -> 5/8
    assert m["acc7"] == pytest.approx(5 / 8)
    # >=0 convention: label [F,F,T,T,T,T,T,F], pred [F,T,F,T,T,T,T,F]: 6/8
    assert m["acc2"] == pytest.approx(6 / 8)
    # weighted F1: class T support 5, tp 4, fp 1, fn 1 -> 8/10; class F support 3, tp 2, fp 1, fn 1 -> 4/6
    assert m["f1"] == pytest.approx((5 * 0.8 + 3 * (4 / 6)) / 8)
    # non-zero: drop idx 2,3 -> label>0 [F,F,T,T,T,F], pred>0 [F,T,T,T,T,F]: 5/6
    assert m["acc2_nonzero"] == pytest.approx(5 / 6)
    # class T support 3: tp 3, fp 1, fn 0 -> 6/7; class F support 3: tp 2, fp 0, fn 1 -> 4/5
    assert m["f1_nonzero"] == pytest.approx((3 * 6 / 7 + 3 * 0.8) / 6)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - label)))
    assert m["corr"] == pytest.approx(np.corrcoef(pred, label)[0, 1])


def test_edge_cases():
    assert weighted_f1(np.array([1, 1, 0]), np.array([1, 1, 0])) == 1.0
    assert weighted_f1(np.array([1, 1]), np.array([0, 0])) == 0.0
    assert math.isnan(pearson(np.ones(4), np.arange(4)))
    m = sentiment_metrics([1.0, -1.0], [0.0, 0.0])
    assert math.isnan(m["acc2_nonzero"]) and math.isnan(m["f1_nonzero"])
    with pytest.raises(ValueError):
        sentiment_metrics([1.0], [1.0, 2.0])
    assert "Acc-7" in format_table(sentiment_metrics([1.0, -1.0], [1.0, -2.0]))
