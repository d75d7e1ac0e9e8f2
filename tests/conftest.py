"""Test-session setup.

Without a GPU, Triton kernels run under the Triton interpreter. The variable must be set before
anything imports Triton (transformers and torch do, and Triton reads it once), so it is set here,
before torch is imported, from the absence of an NVIDIA device.

Seeds (``seeds.py``): every test marked ``randomised`` gets a seed, printed, from ``TCA_TEST_SEED``
or fresh; Hypothesis tests take it as their seed too. ``--seeds A:B`` repeats each randomised test
over ``range(A, B)`` (a local soak run).
"""

import os
import random

import pytest
import seeds

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--seeds",
        metavar="A:B",
        help="run every randomised test once per seed in range(A, B) (a local soak run, not for CI)",
    )


def pytest_configure(config):
    if config.getoption("--seeds"):
        from hypothesis import settings

        # a failing example saved by one seed would be replayed by every later one
        settings.register_profile("tca-soak", database=None)
        settings.load_profile("tca-soak")


def pytest_generate_tests(metafunc):
    span = metafunc.config.getoption("--seeds")
    if span and metafunc.definition.get_closest_marker("randomised"):
        first, stop = (int(part) for part in span.split(":"))
        metafunc.parametrize("tca_test_seed", range(first, stop), indirect=True, ids=lambda s: f"seed{s}")


@pytest.fixture(autouse=True)
def tca_test_seed(request):
    """The seed of a randomised test (None for the others), printed with the command that replays it."""
    if request.node.get_closest_marker("randomised") is None:
        yield None
        return
    if hasattr(request, "param"):
        seed = request.param
    elif os.environ.get(seeds.ENV):
        seed = int(os.environ[seeds.ENV])
    else:
        seed = random.SystemRandom().randrange(2**32)
    print(f"seed = {seed} (replay: {seeds.ENV}={seed} pytest '{request.node.nodeid}')")
    seeds.begin(seed)
    hypothesis_core = _hypothesis_core(request.function)
    if hypothesis_core is not None:  # what Hypothesis's own --hypothesis-seed option sets
        hypothesis_core.global_force_seed, previous = seed, hypothesis_core.global_force_seed
    try:
        yield seed
    finally:
        seeds.end()
        if hypothesis_core is not None:
            hypothesis_core.global_force_seed = previous


def _hypothesis_core(function):
    from hypothesis import core, is_hypothesis_test

    return core if is_hypothesis_test(function) else None


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine threads spin (10x slower): one
    thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A model cache shared by every test: (cache dir, the model and tokenizer loaded from the GGUF)."""
    from tca.bundled.models import load_model

    folder = tmp_path_factory.mktemp("tca-cache")
    previous = os.environ.get("TCA_CACHE_DIR")
    os.environ["TCA_CACHE_DIR"] = str(folder)
    try:
        model, tokenizer = load_model("smollm2")  # de-quantises the GGUF and fills the cache
    finally:
        if previous is None:
            del os.environ["TCA_CACHE_DIR"]
        else:
            os.environ["TCA_CACHE_DIR"] = previous
    return folder, model, tokenizer
