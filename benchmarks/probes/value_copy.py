"""CPU probe: which tokens of a needle's value does each managed layer keep, and does the answer copy it?

One `niah_single_uuid` prompt of the task suite (seeded), answered greedily under `tca.apply` with a
profile; per managed layer, a map of the stored positions from 12 tokens before the value to 2 after
it (`#` kept, `.` dropped), the block holding the value, its rank among the layer's blocks and the
share of the block the rank keeps, and the answer. `--set NAME=VALUE` changes the profile's
configuration (not its budgets), e.g. to select with other importance options on the same budgets.

    python benchmarks/probes/value_copy.py --model gemma3-270m \
        --profile benchmarks/profiles/gemma3-270m-cal16k-off-tau0.85-w1024.json --seed 1 --length 4096
    python benchmarks/probes/value_copy.py ... --set observation_max=1 continuation=0.9

Not a benchmark (nothing is committed from it): it shows why a value is or is not copied.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import tca
from tca.core import selection
from tca.core.budgets import rank_fractions
from tca.eval.tasks import make_sample


def value_span(tokenizer, prompt: str, value: str) -> list[int]:
    """Token indices of ``prompt`` that cover the characters of ``value``."""
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start = prompt.index(value)
    return [i for i, (a, b) in enumerate(offsets) if a < start + len(value) and b > start]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    return parser


def main() -> None:
    """Answer one prompt and print what each managed layer kept of its value."""
    args = build_parser().parse_args()
    model, tokenizer = tca.load_model(args.model)
    profile = tca.Profile.load(args.profile)
    changes = {name: float(value) for name, value in (item.split("=") for item in args.set)}
    profile = dataclasses.replace(profile, config=profile.config.replace(**changes))
    sample = make_sample("niah_single_uuid", tokenizer, args.length, args.seed)
    turns = [{"role": "user", "content": turn} for turn in sample.turns]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    span = value_span(tokenizer, prompt, sample.answers[0])
    print(f"{ids.shape[1]} tokens; value {sample.answers[0]} at tokens {span[0]}..{span[-1]}")

    importances = []  # each managed layer's importance, in call order
    original = selection.candidate_importance

    def recording(*call, **options):
        importances.append(original(*call, **options))
        return importances[-1]

    selection.candidate_importance = recording
    try:
        with torch.no_grad(), tca.apply(model, profile, keep_history=False) as run:
            out = model.generate(ids, max_new_tokens=48, do_sample=False)
    finally:
        selection.candidate_importance = original
    config = profile.config
    for layer, importance in zip(run.layout.layers, importances, strict=True):
        store = run.cache.layers[layer].store
        kept = set(store.positions[0, : int(store.lengths[0, 0])].tolist())
        shown = "".join("#" if p in kept else "." for p in range(span[0] - 12, span[-1] + 3))
        order, _ = selection.rank_blocks(importance, config.block_size, config.alpha)
        block = span[0] // config.block_size
        rank = int((order[0] == block).nonzero())
        row = profile.row(layer)
        share = rank_fractions(profile.mu[row, :1], profile.sigma[row, :1], order.shape[-1])[0, rank]
        print(
            f"layer {layer:2d} {shown} {sum(p in kept for p in span)}/{len(span)} kept; block {block} "
            f"ranks {rank + 1} of {order.shape[-1]}, keeps {float(share):.2f} of it"
        )
    print("answer:", repr(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
