"""What the host history costs a first token, and when its copies should start.

    python benchmarks/probes/history_tail.py [--length N]

One GPU, about 4 minutes at 131072 tokens. Llama-3.1-8B shapes (random bf16 weights, 10% kept,
``benchmarks/e2e.py``'s model and uniform profile), once with one GPU's widths and once with a TP=2
rank's (16 query heads, 4 KV heads, MLP 7168: a rank's work without its all-reduces). Three ways
of keeping a prompt's K/V, taking turns, four first tokens each after a warm-up of each:
- ``after``: each layer's copy to the host starts after its selection and sparse attention (the
  order before this probe);
- ``before``: it starts as soon as the layer has its K/V, before the selection;
- ``none``: ``keep_history=False``.
Each first token is timed twice (``e2e.timed_generate``): when the model's stream has it
(``stream``, what generate's caller waits for) and when the whole device is idle (``device``, what
``benchmarks/tp.py``'s ``ttft_ms`` counts: the history's copies on their side stream included).
"""

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
from prefill_variants import RANK_WIDTHS, llama_case  # noqa: E402

import tca  # noqa: E402
from tca.integrations.transformers.cache import TCACacheLayer  # noqa: E402
from tca.integrations.transformers.run import TCARun  # noqa: E402

WAYS = ("after", "before", "none")


@contextmanager
def copies_start_before_attention():
    """Each prompt's host copy issued when its layer's attention starts (then not again after it)."""
    prefill, remember = TCARun.prefill, TCACacheLayer.remember

    def early_prefill(self, layer_idx, query, key, value, key_start, scale):
        layer = self.cache.layers[layer_idx] if self.cache is not None else None
        if layer is not None and layer.seen == 0 and layer.pending == key.shape[2]:
            remember(layer, key, value)
            layer.remembered_early = True
        return prefill(self, layer_idx, query, key, value, key_start, scale)

    def late_remember(self, key, value):
        if getattr(self, "remembered_early", False):
            self.remembered_early = False
            return
        remember(self, key, value)

    TCARun.prefill, TCACacheLayer.remember = early_prefill, late_remember
    try:
        yield
    finally:
        TCARun.prefill, TCACacheLayer.remember = prefill, remember


def first_token(model, ids, profile, way: str) -> tuple[float, float]:
    """(device ms, stream ms) of one first token kept ``way``."""
    early = copies_start_before_attention() if way == "before" else _nothing()
    with early, tca.apply(model, profile, keep_history=way != "none"):
        ttft, _, _, _, stream = e2e.timed_generate(model, ids, 0)
    return ttft, stream


@contextmanager
def _nothing():
    yield


def compare(length: int, name: str, **fields) -> None:
    """Every way, four first tokens each, interleaved; medians printed."""
    model, ids, profile = llama_case(length, **fields)
    for way in WAYS:  # warm-up: compiles, pins the history's memory
        first_token(model, ids, profile, way)
    times = {way: [] for way in WAYS}
    for _ in range(4):
        for way in WAYS:
            times[way].append(first_token(model, ids, profile, way))
            device, stream = times[way][-1]
            print(f"  {name}, {way}: device {device:.0f} ms, stream {stream:.0f} ms", flush=True)
    for way in WAYS:
        device = statistics.median(t[0] for t in times[way])
        stream = statistics.median(t[1] for t in times[way])
        print(f"{name}, {way}: median device {device:.0f} ms, stream {stream:.0f} ms", flush=True)
    del model
    torch.cuda.empty_cache()


def main(length: int) -> None:
    """One GPU's widths, then a TP=2 rank's."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, length {length}", flush=True)
    compare(length, "one GPU (32/8 heads)")
    compare(length, "a TP=2 rank's widths (16/4 heads)", **RANK_WIDTHS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    main(parser.parse_args().length)
