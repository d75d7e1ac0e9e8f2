"""CPU probe: does a selection made at prefill keep the needle? Exact top-k by the last query
against SnapKV's window of observation queries, at the same kept fraction.

For each single-number needle prompt of the task suite (2K tokens, seeds 100-109, the seeds of
the committed GPU run), the prefill runs under each method and records, per (layer, KV head),
whether every token of the needle's value is among the kept keys (or the local window).

    python benchmarks/probes/single_query_selection.py [--fraction 0.5] [--length 2048]

Run on 2026-11-26: benchmarks/results/single-query-selection-cpu.log (top-k, SnapKV, random at 2K)
and xattention-position-bias-cpu.log (XAttention-style against SnapKV- and FlexPrefill-style at 2K
and 8K).
"""

import argparse

import torch

from tca.bundled.models import load_model
from tca.eval.tasks import make_sample
from tca.integrations.transformers import apply
from tca.methods.selector import MethodSelector


class RecordingSelector(MethodSelector):
    """A baseline's selector that notes, per layer and KV head, whether ``needle`` positions are kept."""

    def __init__(self, model, method, kept_fraction, needle: torch.Tensor):
        super().__init__(model, method, kept_fraction)
        self.needle = needle  # (n,) token positions of the needle's value
        self.kept: dict[int, list[bool]] = {}
        self.run_lengths: list[float] = []  # per (layer, KV head): kept tokens per contiguous run
        self.early_shares: list[float] = []  # per (layer, KV head): kept candidates in the first half

    def select(self, layer, query, key, scale, key_start):
        """The method's selection, unchanged; notes which KV heads keep every needle token."""
        selection = super().select(layer, query, key, scale, key_start)
        window_start = key.shape[2] - self.config.effective_window
        heads = []
        for g in range(key.shape[1]):
            kept = set(selection.indices[0, g, : int(selection.counts[0, g])].tolist())
            heads.append(all(int(p) in kept or int(p) >= window_start for p in self.needle))
            runs = sum(1 for i in kept if i - 1 not in kept)
            self.run_lengths.append(len(kept) / max(runs, 1))
            self.early_shares.append(sum(i < window_start / 2 for i in kept) / max(len(kept), 1))
        self.kept[layer] = heads
        return selection


def needle_positions(tokenizer, prompt: str, value: str) -> torch.Tensor:
    """Token positions of the characters of ``value`` in ``prompt`` (its first occurrence)."""
    start = prompt.index(value)
    encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    spans = encoded["offset_mapping"]
    return torch.tensor([i for i, (a, b) in enumerate(spans) if a < start + len(value) and b > start])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 110)))
    parser.add_argument("--methods", nargs="+", default=["topk_last", "snapkv", "random"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2")
    print(f"niah_single_number, {args.length} tokens, kept fraction {args.fraction}")
    print("share of the (layer, KV head) pairs keeping every needle token; layers where none does;")
    print("mean length of the runs of consecutive kept tokens (outside the window);")
    print("share of the kept candidates in the first half of the candidates (0.5 = no position bias)")
    for method in args.methods:
        shares, blind_layers, run_lengths, early = [], [], [], []
        for seed in args.seeds:
            sample = make_sample("niah_single_number", tokenizer, args.length, seed)
            conversation = [{"role": "user", "content": sample.turns[-1]}]
            prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            needle = needle_positions(tokenizer, prompt, sample.answers[0])
            selector = RecordingSelector(model, method, args.fraction, needle)
            with torch.no_grad(), apply(model, selector):
                model(ids)
            heads = [kept for layer in sorted(selector.kept) for kept in selector.kept[layer]]
            shares.append(sum(heads) / len(heads))
            blind_layers.append(sum(not any(kept) for kept in selector.kept.values()))
            run_lengths += selector.run_lengths
            early += selector.early_shares
        print(
            f"{method:10s} share {sum(shares) / len(shares):.2f} (per seed {[round(s, 2) for s in shares]}); "
            f"layers with no head keeping it: mean {sum(blind_layers) / len(blind_layers):.1f} "
            f"of {len(selector.kept)}; "
            f"mean kept run {sum(run_lengths) / len(run_lengths):.1f} tokens; "
            f"first-half share {sum(early) / len(early):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
