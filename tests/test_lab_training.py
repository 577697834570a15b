"""cggr_lab.training: budgets, the learning-rate schedule, and where a curve first reaches a loss."""

import pytest

from cggr_lab.training import Budget, first_reach, lr_factor


def test_budget_and_schedules():
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(steps=3, seconds=1.0)
    assert Budget(steps=10).fraction(5, 99.0) == 0.5 and Budget(seconds=4.0).fraction(99, 1.0) == 0.25
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5) and lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.1)


def test_first_reach_interpolates():
    assert first_reach([0, 10, 20], [5.0, 4.0, 3.0], 3.5) == pytest.approx(15.0)
    assert first_reach([0, 10, 20], [5.0, 4.0, 3.0], 2.0) is None
    assert first_reach([0, 10], [1.0, 0.5], 2.0) == 0.0
