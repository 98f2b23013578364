"""Optimizers and the LR schedule: each schedule's curve, warm-up, plateau, state round trip."""
import math

import pytest
import torch

from minidalle.config import TrainingConfig
from minidalle.errors import ConfigError
from minidalle.train.optim import LrSchedule, build_optimizer


def _opt(**kw):
    t = TrainingConfig(**kw)
    model = torch.nn.Linear(3, 2)
    return build_optimizer(model.parameters(), t), t


def _curve(sched, n, metrics=None):
    out = []
    for i in range(n):
        out.append(sched.lr)
        sched.step(None if metrics is None else metrics[i])
    return out


def test_adam_and_adamw_get_their_hyperparameters():
    opt, _ = _opt(optimizer="adam", lr=1e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.1)
    assert type(opt) is torch.optim.Adam
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.8, 0.9), 1e-6, 0.1)
    opt, _ = _opt(optimizer="adamw")
    assert type(opt) is torch.optim.AdamW


def test_betas_must_be_two_numbers():
    from minidalle.config import FieldError

    # The config's validator refuses them (a config file's error then names training.betas).
    with pytest.raises(FieldError, match="betas: expected two numbers in"):
        _opt(betas=[0.9])


def test_constant_with_linear_warmup():
    opt, t = _opt(lr=1.0, warmup_steps=4)
    assert _curve(LrSchedule(opt, t, 10), 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_multi_step():
    opt, t = _opt(lr=1.0, lr_scheduler="multi_step", lr_milestones=[2, 4], lr_gamma=0.1)
    got = _curve(LrSchedule(opt, t, 10), 6)
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_multi_step_after_warmup():
    opt, t = _opt(lr=1.0, lr_scheduler="multi_step", lr_milestones=[3], lr_gamma=0.5, warmup_steps=2)
    assert _curve(LrSchedule(opt, t, 10), 5) == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5])


def test_cosine_reaches_min_lr_at_the_end():
    opt, t = _opt(lr=1.0, lr_scheduler="cosine", min_lr=0.1)
    s = LrSchedule(opt, t, 4)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    assert _curve(s, 5) == pytest.approx(expected)
    assert s.lr_at(100) == pytest.approx(0.1)


def test_cosine_with_warmup():
    opt, t = _opt(lr=2.0, lr_scheduler="cosine", warmup_steps=2)
    got = _curve(LrSchedule(opt, t, 6), 7)
    assert got[:2] == pytest.approx([1.0, 2.0])  # warm-up, then the cosine starts at lr
    assert got[4] == pytest.approx(1.0)  # half way through the 4 cosine steps
    assert got[6] == pytest.approx(0.0)


def test_reduce_on_plateau():
    opt, t = _opt(lr=1.0, lr_scheduler="reduce_on_plateau", lr_patience=2, lr_gamma=0.5, min_lr=0.2)
    s = LrSchedule(opt, t, 100)
    losses = [5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3]
    got = _curve(s, len(losses), losses)
    # improvement resets; more than `patience` steps without it halves the LR (floor 0.2)
    assert got == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2])


def test_state_round_trip_continues_the_same_curve():
    opt, t = _opt(lr=1.0, lr_scheduler="reduce_on_plateau", lr_patience=0, lr_gamma=0.5)
    a = LrSchedule(opt, t, 100)
    _curve(a, 3, [3, 3, 3])
    opt2, _ = _opt(lr=1.0, lr_scheduler="reduce_on_plateau", lr_patience=0, lr_gamma=0.5)
    b = LrSchedule(opt2, t, 100)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr == 0.25
    assert _curve(a, 3, [3, 2, 2]) == _curve(b, 3, [3, 2, 2])


def test_step_reports_lr_changes():
    opt, t = _opt(lr=1.0, lr_scheduler="multi_step", lr_milestones=[2])
    s = LrSchedule(opt, t, 10)
    assert [s.step() for _ in range(3)] == [False, True, False]
