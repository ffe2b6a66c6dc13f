import pytest

from hf_blockprune import BlockPruningConfig
from hf_blockprune.pruning.schedule import schedule_progress

from helpers import schedule_values


@pytest.mark.parametrize(
    "step, progress",
    [(0, 0.0), (10, 0.0), (20, 1 / 6), (40, 0.5), (70, 1.0), (100, 1.0)],
)
def test_progress_holds_then_moves_linearly(step, progress):
    assert schedule_progress(step, 100, 0.1, 0.3) == pytest.approx(progress)


def test_threshold_and_lambda_follow_the_cubic():
    config = BlockPruningConfig(initial_threshold=0.0, final_threshold=0.1, final_lambda=8.0)
    for step in (0, 25, 40, 55, 100):
        p = min(max((step - 10) / 60, 0.0), 1.0)
        threshold, lam = schedule_values(step, 100, config)
        assert threshold == pytest.approx(0.1 + (0.0 - 0.1) * (1 - p) ** 3)
        assert lam == pytest.approx(8.0 * (1 - (1 - p) ** 3))
