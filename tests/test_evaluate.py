"""Held-out evaluation helpers: the paired difference between two checkpoints' per-problem scores."""
import pytest
import torch

from zaya_lib.train.evaluate import paired_difference


def test_paired_difference():
    d = paired_difference([0, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1])
    assert d["diff"] == pytest.approx(2 / 6) and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert d["se"] == pytest.approx(float(torch.tensor([1., 0, 0, 0, 1, 0]).std() / 6 ** 0.5))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0], [])
