"""Seeds of randomised tests: one per test, printed, and replayable with ``TCA_TEST_SEED``.

A test that draws random inputs is marked ``@pytest.mark.randomised``; ``conftest.py`` gives it a
seed before it runs: ``TCA_TEST_SEED`` when set (to replay a failure), else a fresh one, printed
(pytest shows it with a failure). ``pytest --seeds A:B`` runs each randomised test once per seed
in ``range(A, B)``: a local soak run, too slow for CI. ``fresh_seed()`` returns the test's seed,
then seeds derived from it, so a test may draw several and one number still replays them all.
"""

from __future__ import annotations

ENV = "TCA_TEST_SEED"
_state: dict = {"seed": None, "draws": 0}


def begin(seed: int) -> None:
    """A randomised test starts with ``seed``."""
    _state.update(seed=seed, draws=0)


def end() -> None:
    _state.update(seed=None, draws=0)


def fresh_seed() -> int:
    """The running test's seed on the first call, then seeds derived from it (in [0, 2**32))."""
    seed = _state["seed"]
    if seed is None:
        raise RuntimeError(
            "fresh_seed() outside a test marked @pytest.mark.randomised: mark the test, so that it "
            "gets a printed seed that TCA_TEST_SEED replays."
        )
    draw = _state["draws"]
    _state["draws"] += 1
    return seed if draw == 0 else (seed + draw * 0x9E3779B1) % 2**32
