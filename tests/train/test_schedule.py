import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2_workers.train.schedule import WSDSchedule, wsd_for_run


def test_warmup_constant_cosine_decay() -> None:
    s = WSDSchedule(peak_lr=1.0, warmup_steps=4, decay_start=10, decay_steps=10, min_lr=0.1)
    assert [s(i) for i in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert all(s(i) == 1.0 for i in range(4, 11))
    assert s(15) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s(20) == pytest.approx(0.1) and s(25) == pytest.approx(0.1)


def test_for_run_puts_the_decay_at_the_end_and_shrinks_what_does_not_fit() -> None:
    s = wsd_for_run(2e-4, total_steps=100, warmup_steps=10, decay_steps=30, final_lr_ratio=0.1)
    assert (s.warmup_steps, s.decay_start, s.decay_steps) == (10, 70, 30)
    assert s.min_lr == pytest.approx(2e-5)
    short = wsd_for_run(1.0, total_steps=12, warmup_steps=10, decay_steps=30, final_lr_ratio=0.0)
    assert (short.warmup_steps, short.decay_start, short.decay_steps) == (10, 10, 2)
    assert short(12) == 0.0


@given(
    warmup=st.integers(0, 50),
    stable=st.integers(0, 50),
    decay=st.integers(0, 50),
    ratio=st.floats(0, 1),
)
def test_lr_is_bounded_and_never_rises_after_the_warmup(warmup: int, stable: int, decay: int, ratio: float) -> None:
    s = WSDSchedule(1.0, warmup, warmup + stable, decay, ratio)
    lrs = [s(i) for i in range(1, warmup + stable + decay + 5)]
    assert all(min(ratio, lr) >= 0 and lr <= 1.0 + 1e-12 for lr in lrs)
    after = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))
    assert lrs[-1] == pytest.approx(ratio)


def test_bad_schedules_are_rejected() -> None:
    with pytest.raises(ValueError, match="decay"):
        WSDSchedule(1.0, warmup_steps=10, decay_start=5, decay_steps=1)
    with pytest.raises(ValueError, match=">= 0"):
        WSDSchedule(-1.0, 0, 0, 0)
