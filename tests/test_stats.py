"""stats: the intervals the reports print. The two-level interval (training seeds and stories) against
the story-only one, on data built with and without seed-to-seed variance."""

import numpy as np
import pytest

from hntitles.analysis import stats


def story_effects(stories: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.1, 0.15, stories)


def test_without_seed_variance_the_two_level_interval_is_the_story_interval():
    row = story_effects()
    agreeing = np.tile(row, (3, 1))  # three seeds that trained the same run
    two = stats.two_level_bootstrap(agreeing, n_boot=20000)
    one = stats.mean_interval(row, n_boot=20000)  # scipy's percentile bootstrap over the stories
    assert two == pytest.approx(one, abs=1e-9)
    # ... and drawing the stories anew within each seed would have narrowed it by ~1/sqrt(3): not done
    assert two[2] - two[1] > 0.9 * (one[2] - one[1])


def test_seed_variance_widens_the_two_level_interval():
    row = story_effects()
    shifts = np.array([[-0.12], [0.0], [0.12]])  # each seed's run lands higher or lower on every story
    varied = row + shifts
    two = stats.two_level_bootstrap(varied, n_boot=20000)
    story_only = stats.mean_interval(varied.mean(axis=0), n_boot=20000)  # the seeds averaged away
    assert two[0] == pytest.approx(story_only[0])
    assert two[2] - two[1] > 1.3 * (story_only[2] - story_only[1])


def test_two_level_interval_is_deterministic_and_refuses_one_story():
    data = np.vstack([story_effects(seed=s) for s in (1, 2)])
    assert stats.two_level_bootstrap(data, seed=3) == stats.two_level_bootstrap(data, seed=3)
    assert stats.two_level_bootstrap(data, seed=3) != stats.two_level_bootstrap(data, seed=4)
    with pytest.raises(ValueError, match=">= 2 stories"):
        stats.two_level_bootstrap([[0.1], [0.2]])


def test_paired_bootstrap_contains_the_mean():
    after, before = story_effects(seed=5) + 0.1, story_effects(seed=5)
    mean, lo, hi = stats.paired_bootstrap(list(after), list(before))
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equal, non-empty"):
        stats.paired_bootstrap([0.1], [0.1, 0.2])
