"""gaps_to_full against an independent computation on fresh random rows."""

import numpy as np
import pytest
from seeds import fresh_seed

from tca.eval.compare import gaps_to_full


def rows_for(setting: str, scores: dict[tuple, float]) -> list[dict]:
    return [
        {"setting": setting, "task": task, "length": length, "seed": seed, "score": score}
        for (task, length, seed), score in scores.items()
    ]


@pytest.fixture
def rng():
    return np.random.default_rng(fresh_seed())


@pytest.mark.randomised
def test_gap_is_the_mean_paired_difference_over_shared_prompts(rng):
    prompts = [
        (t, length, s)
        for t in ("a", "b", "c")
        for length in (300, 700)
        for s in range(int(rng.integers(5, 12)))
    ]
    full = {p: float(rng.choice([0, 50, 100])) for p in prompts}
    other = {
        p: float(rng.choice([0, 50, 100])) for p in prompts if rng.random() > 0.2
    }  # some prompts missing
    perplexity = [{"setting": "x@0.3", "task": "perplexity", "length": 300, "seed": 0, "score": None}]
    gaps = gaps_to_full(rows_for("full", full) + rows_for("x@0.3", other) + perplexity, resamples=500)
    assert [(g["setting"], g["length"]) for g in gaps] == [("x@0.3", 300), ("x@0.3", 700)]
    for gap in gaps:
        diffs = np.array([other[p] - full[p] for p in other if p[1] == gap["length"]])
        assert gap["prompts"] == len(diffs)
        assert gap["gap"] == pytest.approx(diffs.mean())
        low, high = gap["ci95"]
        assert diffs.min() <= low <= gap["gap"] + 1e-9 and gap["gap"] - 1e-9 <= high <= diffs.max()


@pytest.mark.randomised
@pytest.mark.parametrize("shift", [0.0, 7.5, -20.0])
def test_a_constant_shift_has_a_zero_width_interval(rng, shift):
    full = {("t", 100, s): float(rng.uniform(0, 80)) for s in range(9)}
    shifted = {p: v + shift for p, v in full.items()}
    (gap,) = gaps_to_full(rows_for("full", full) + rows_for("y", shifted), resamples=200)
    assert gap["gap"] == pytest.approx(shift) and gap["ci95"] == pytest.approx([shift, shift])


@pytest.mark.randomised
def test_interval_width_matches_the_normal_approximation(rng):
    n = 400
    full = {("t", 100, s): 50.0 for s in range(n)}
    other = {p: 50.0 + float(rng.normal(-2.0, 10.0)) for p in full}
    (gap,) = gaps_to_full(rows_for("full", full) + rows_for("z", other), resamples=2000)
    diffs = np.array([other[p] - 50.0 for p in full])
    expected = 2 * 1.96 * diffs.std(ddof=1) / np.sqrt(n)
    assert gap["ci95"][1] - gap["ci95"][0] == pytest.approx(expected, rel=0.2)


@pytest.mark.randomised
def test_an_interval_ignores_the_other_settings_and_the_row_order(rng):
    prompts = [("t", 200, s) for s in range(int(rng.integers(8, 30)))]
    full = rows_for("full", {p: float(rng.choice([0, 100])) for p in prompts})
    mine = rows_for("m@0.5", {p: float(rng.choice([0, 100])) for p in prompts})
    other = rows_for("a@0.1", {p: float(rng.choice([0, 100])) for p in prompts})  # sorts first
    alone = gaps_to_full(full + mine, resamples=300)
    shuffled = [(full + other + mine)[i] for i in rng.permutation(3 * len(prompts))]
    beside = [g for g in gaps_to_full(shuffled, resamples=300) if g["setting"] == "m@0.5"]
    assert beside == alone
