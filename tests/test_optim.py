"""The inner learning-rate schedule: nanoGPT's warm-up (no step at lr 0), then cosine."""

import math

import pytest

from locotrain.optim import lr_at


@pytest.mark.parametrize("W", [1, 4, 10])
def test_warm_up_step_s_trains_at_lr_times_s_plus_1_over_W_plus_1(W):
    """100 steps, W of them warm-up: step s starts at progress s/100 and trains at
    lr (s + 1) / (W + 1); the first step already moves (the bug this pins: lr 0 at step 0)."""
    lr, steps = 3e-3, 100
    for s in range(W):
        got = lr_at(s / steps, lr, W / steps, 0.1, step=1 / steps)
        assert got == pytest.approx(lr * (s + 1) / (W + 1))
    assert lr_at(0.0, lr, W / steps, 0.1, step=1 / steps) > 0


def test_after_warm_up_cosine_from_lr_to_lr_times_min_ratio():
    lr, warmup, ratio = 1.0, 0.2, 0.1
    assert lr_at(0.2, lr, warmup, ratio) == pytest.approx(1.0)
    assert lr_at(0.6, lr, warmup, ratio) == pytest.approx(ratio + (1 - ratio) * 0.5)
    assert lr_at(1.0, lr, warmup, ratio) == pytest.approx(ratio)
    midway = 0.2 + 0.8 / 3
    assert lr_at(midway, lr, warmup, ratio) == pytest.approx(
        ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi / 3)))
