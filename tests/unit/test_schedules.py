"""Properties of the lambda(t) schedules (docs/architecture.md, The method 6)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.service.schedules import SCHEDULES, SHAPES, ScheduleConfig, lambda_at, progress

configs = st.builds(
    ScheduleConfig,
    shape=st.sampled_from(SHAPES),
    lambda_min=st.floats(0, 1),
    lambda_max=st.floats(0, 1),
    warmup_epochs=st.integers(0, 5),
    kappa=st.floats(0.1, 50),
    center=st.floats(0, 1),
)


def test_registry_has_every_shape() -> None:
    assert set(SCHEDULES) == set(SHAPES)


@settings(max_examples=60, deadline=None)
@given(config=configs, epochs=st.integers(1, 40))
def test_schedule_is_monotone_between_its_ends(config: ScheduleConfig, epochs: int) -> None:
    values = [lambda_at(t, epochs, config) for t in range(epochs)]
    lo, hi = sorted((config.lambda_min, config.lambda_max))
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
    sign = 1.0 if config.lambda_max >= config.lambda_min else -1.0
    assert all(sign * (b - a) >= -1e-12 for a, b in itertools.pairwise(values))
    assert values[0] == pytest.approx(config.lambda_min)
    for t in range(min(config.warmup_epochs + 1, epochs)):  # warm-up holds the start
        assert values[t] == pytest.approx(config.lambda_min)
    if config.shape == "constant":
        assert all(v == pytest.approx(config.lambda_min) for v in values)
    elif epochs - 1 > config.warmup_epochs:  # a moving schedule ends at lambda_max
        assert values[-1] == pytest.approx(config.lambda_max)


@pytest.mark.parametrize("shape", ["cosine", "linear", "sigmoid"])
def test_moving_shapes_are_symmetric_about_the_midpoint(shape: str) -> None:
    config = ScheduleConfig(shape=shape)
    for t in range(11):
        assert lambda_at(t, 11, config) + lambda_at(10 - t, 11, config) == pytest.approx(1.0)


def test_progress_past_the_end_stays_at_one() -> None:
    assert progress(50, 10, 0) == 1.0
    assert lambda_at(50, 10, ScheduleConfig(shape="linear")) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"shape": "zigzag"}, "zigzag"),
        ({"lambda_min": -0.1}, "-0.1"),
        ({"lambda_max": 1.5}, "1.5"),
        ({"warmup_epochs": -2}, "-2"),
        ({"kappa": 0.0}, "kappa=0.0"),
        ({"center": 1.2}, "1.2"),
    ],
)
def test_bad_config_names_the_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ScheduleConfig(**kwargs)


def test_bad_epochs() -> None:
    with pytest.raises(ValueError, match="epochs=0"):
        lambda_at(0, 0, ScheduleConfig())
    with pytest.raises(ValueError, match="-1"):
        lambda_at(-1, 5, ScheduleConfig())
