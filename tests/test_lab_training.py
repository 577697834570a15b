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


def test_accumulated_micro_batches_step_like_one_batch():
    """train_step on micro-batches: the mean of their losses, and the gradient of the whole batch (dense; a
    fresh routing per micro-batch for a routed model: the router's micro-batch counter moves per forward)."""
    import copy

    import torch

    import cggr
    from cggr_lab.training import train_step
    from tests.tiny import hf_model

    model = hf_model("llama", layers=2, seed=7)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(7))
    grads = {}

    class Keep(torch.optim.SGD):  # records the gradients the step saw, then steps by 0
        def step(self, closure=None):
            grads[id(self)] = [p.grad.clone() for p in self.param_groups[0]["params"]]

    a, b = Keep(model.parameters(), lr=0.0), Keep(twin.parameters(), lr=0.0)
    whole = train_step(model, ids, a)
    split = train_step(twin, [ids[:2], ids[2:]], b)
    # HF's loss is a mean over each micro-batch's tokens: equal token counts make the two means one mean.
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads[id(a)], grads[id(b)]):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    router = cggr.attach(twin, warmup_steps=0)
    seeds = []
    real = router._planner.decide_into
    router._planner.decide_into = lambda *a, **k: (seeds.append(k["draw_seed"]), real(*a, **k))[1]
    train_step(twin, [ids[:2], ids[2:]], b, router)
    assert len(seeds) == 2 and seeds[0] != seeds[1] and router.metrics()["step"] == 1.0
