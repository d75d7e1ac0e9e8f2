"""Where a decode step goes on Gemma 3 270M shapes at 32K, dense and under the bundled profile.

    python benchmarks/probes/gemma_decode.py [length]       # one GPU, about a minute

Random bf16 weights of Gemma 3 270M's shape (``benchmarks/e2e.py``'s), the bundled profile. Per
mode: the time of a 33-token generate minus a 1-token one, over 32 (no synchronisation between
steps, unlike ``e2e.py``'s per-token clock), then ``torch.profiler``'s operators per decode step
(a 17-token generate minus a 1-token one, over 16), by host time and by device time. Its output on
an H200 at 29eb228 (plus this file) is ``benchmarks/results/gemma-decode-nvidia-h200.log``.
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parents[1]))
import e2e  # noqa: E402

import tca  # noqa: E402
from tca.bundled.profiles import profile_for  # noqa: E402


def generate_ms(model, ids, new_tokens: int) -> float:
    """Wall milliseconds of one greedy generate of ``new_tokens`` tokens."""
    e2e.sync()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    e2e.sync()
    return (time.perf_counter() - start) * 1e3


def per_step(model, ids) -> list[tuple[float, float, float, str]]:
    """(host us, device us, calls, operator) per decode step: a 17-token generate minus a 1-token one."""
    totals = []
    for new_tokens in (1, 17):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            generate_ms(model, ids, new_tokens)
        totals.append(
            {e.key: (e.count, e.self_cpu_time_total, e.self_device_time_total) for e in trace.key_averages()}
        )
    one, many = totals
    rows = []
    for key, (calls, host, device) in many.items():
        calls0, host0, device0 = one.get(key, (0, 0, 0))
        rows.append(((host - host0) / 16, (device - device0) / 16, (calls - calls0) / 16, key))
    return rows


def main(length: int) -> None:
    model = e2e.random_model(e2e.model_config("gemma3-270m", length + 600), "cuda")
    ids = torch.randint(3, 100000, (1, length), generator=torch.Generator().manual_seed(0)).cuda()
    profile_file = profile_for("gemma3-270m")
    for mode in ("dense", "tca"):
        with tca.apply(model, profile_file) if mode == "tca" else torch.no_grad():
            generate_ms(model, ids, 3)  # warm-up
            one, many = generate_ms(model, ids, 1), generate_ms(model, ids, 33)
            print(f"{mode}: 1 token {one:.0f} ms, 33 tokens {many:.0f} ms: {(many - one) / 32:.2f} ms a step")
            rows = per_step(model, ids)
        print(f"{mode}: per decode step, top by host time (us host, us device, calls, op)")
        for row in sorted(rows, reverse=True)[:25]:
            print(f"  {row[0]:9.1f} {row[1]:9.1f} {row[2]:6.1f}  {row[3][:90]}")
        print(f"{mode}: top by device time")
        for row in sorted(rows, key=lambda r: -r[1])[:12]:
            print(f"  {row[0]:9.1f} {row[1]:9.1f} {row[2]:6.1f}  {row[3][:90]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32768)
