"""Where a second turn's time to first token goes, dense against TCA (with and without history).

    python benchmarks/probes/next_turn.py [--length N] [--python | --sites]

One GPU, about 2 minutes at 32768 tokens. Llama-3.1-8B shapes (random bf16 weights, 10% kept,
``benchmarks/e2e.py``'s model and uniform profile). A conversation is e2e's ``--turns`` one: the
prompt, a 16-token answer, then 64 new tokens on the same cache, timed to their first token. Each
mode runs two conversations (the first compiles the new turn's kernels) and prints the second's
time; then one more second turn per mode under ``torch.profiler``: its device and host time by
operator, and how often the host waited for the device (``--python``: cProfile's functions instead;
``--sites``: the aten operations TCA's own code issued, by line).
"""

import argparse
import collections
import cProfile
import inspect
import pstats
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parents[1]))
import e2e  # noqa: E402

import tca  # noqa: E402

FOLLOW_UP = 64
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")
TCA = str(Path(tca.__file__).parent)
NO_LAUNCH = {"view", "_unsafe_view", "as_strided", "expand", "slice", "select", "unsqueeze", "squeeze", "t",
             "transpose", "permute", "unbind", "split", "alias", "detach", "empty", "empty_like",
             "empty_strided", "lift_fresh", "_local_scalar_dense", "resolve_conj", "resolve_neg"}  # fmt: skip


class Sites(TorchDispatchMode):
    """Counts the aten operations (those that may launch) by the innermost line of TCA's code above them."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(TCA)]
            if frames:
                where = frames[-1]
                self.sites[f"{Path(where.filename).name}:{where.lineno} {where.name} {name}"] += 1
        return func(*args, **(kwargs or {}))

    def report(self, layers: int) -> None:
        print(f"  {sum(self.sites.values()) / layers:.1f} operations a layer from TCA's code")
        for site, count in self.sites.most_common(60):
            print(f"  {count / layers:6.2f}  {site}")


def conversation(model, ids, cache, profiled: str | None = None) -> float:
    """ms to the first token of the second turn (prompt, 16-token answer, 64 new tokens)."""
    kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    follow_up = torch.randint(3, 1000, (1, FOLLOW_UP), generator=torch.Generator().manual_seed(1)).cuda()
    options = dict(do_sample=False, pad_token_id=0, **{kwarg: cache})
    with torch.no_grad():
        first = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, **options
        )
        turn = torch.cat([first, follow_up], 1)
        torch.cuda.synchronize()
        if profiled == "sites":
            with Sites() as sites:
                model.generate(turn, attention_mask=torch.ones_like(turn), max_new_tokens=1, **options)
            sites.report(model.config.num_hidden_layers)
            return float("nan")
        if profiled == "python":
            with cProfile.Profile() as python:
                model.generate(turn, attention_mask=torch.ones_like(turn), max_new_tokens=1, **options)
                torch.cuda.synchronize()
            pstats.Stats(python).sort_stats("tottime").print_stats(25)
            pstats.Stats(python).sort_stats("cumulative").print_stats(40)
            return float("nan")
        if profiled == "device":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.generate(turn, attention_mask=torch.ones_like(turn), max_new_tokens=1, **options)
                torch.cuda.synchronize()
            report(prof)
            return float("nan")
        start = time.perf_counter()
        model.generate(turn, attention_mask=torch.ones_like(turn), max_new_tokens=1, **options)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3


def report(prof) -> None:
    """Top operators by device time and by host time, and the host's waits for the device."""
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    for event in events:
        if event.key in WAITS:
            print(f"  {event.key}: {event.count} calls, {event.self_cpu_time_total / 1e3:.1f} ms on the host")


def main(length: int, profiled: str) -> None:
    """Dense, TCA without history, TCA with history: three conversations each, then one profiled
    (``profiled``: "device", "python" or "sites")."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, length {length}", flush=True)
    model = e2e.random_model(e2e.model_config("llama-3.1-8b", length + 512), "cuda")
    ids = torch.randint(3, 128000, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
    profile_ = e2e.uniform_profile(model, 0.1, length)
    modes = {
        "dense": lambda: (None, DynamicCache),
        "tca, no history": lambda: (tca.apply(model, profile_, keep_history=False), None),
        "tca, history": lambda: (tca.apply(model, profile_), None),
    }
    for name, make in modes.items():
        scope, new_cache = make()
        run = scope.__enter__() if scope is not None else None
        new_cache = new_cache or run.new_cache
        times = [conversation(model, ids, new_cache()) for _ in range(3)]
        print(f"{name}: second turn {[round(t) for t in times]} ms", flush=True)
        print(f"==== {name}: profiled second turn", flush=True)
        conversation(model, ids, new_cache(), profiled=profiled)
        if scope is not None:
            scope.__exit__(None, None, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--python", action="store_true", help="profile the host with cProfile instead")
    how.add_argument("--sites", action="store_true", help="count TCA's aten operations by line instead")
    args = parser.parse_args()
    main(args.length, "python" if args.python else "sites" if args.sites else "device")
