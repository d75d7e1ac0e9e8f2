"""Why is the sparse prefill kernel slower inside a model's prefill than alone?

    python benchmarks/probes/kernel_gap.py [length]        # one GPU, about 2 minutes at 131072

Llama-3.1-8B shapes, random bf16 weights, the uniform 10% profile (``benchmarks/e2e.py``'s). Times,
layer by layer, each ``launchers.sparse_prefill`` call of a TCA prefill with CUDA events, in three
forwards: as the model runs it; with the device drained before each call and the call repeated
twice right after it on the same inputs; and with ``keep_history=False``. Also the selection calls,
the SM clock and power sampled by ``nvidia-smi`` during each forward, and the last layer's call
timed alone afterwards (a CUDA graph, as ``prefill_tiles.py`` times). A gap that the repeats share
is the inputs' or the device's (clocks); one they do not is the model's context around the call.
Its output on an H200 is ``benchmarks/results/kernel-gap-nvidia-h200.log``, written by its version
at 8a95bf9 (the same measurements, its own CUDA-event wrappers instead of ``e2e.AttentionTimer``).
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import e2e  # noqa: E402
from attention import time_ms  # noqa: E402

import tca  # noqa: E402
from tca import ops  # noqa: E402
from tca.ops.triton import launchers  # noqa: E402


class Clocks:
    """``nvidia-smi`` sampling the SM clock (MHz) and power (W) every 20 ms while open."""

    def __enter__(self):
        self.file = tempfile.NamedTemporaryFile("w+", suffix=".csv")
        query = "--query-gpu=clocks.sm,power.draw,temperature.gpu"
        args = ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "20", "-i", "0"]
        self.proc = subprocess.Popen(args, stdout=self.file, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.file.seek(0)
        rows = [[float(x) for x in line.split(",")] for line in self.file if line.count(",") == 2]
        self.summary = "no samples"
        if rows:
            clock, power, temp = zip(*rows, strict=True)
            self.summary = (
                f"SM MHz min {min(clock):.0f} median {statistics.median(clock):.0f} max {max(clock):.0f}; "
                f"W median {statistics.median(power):.0f} max {max(power):.0f}; C max {max(temp):.0f}"
            )
        self.file.close()


def forward(model, ids, profile, drain: bool, repeats: int, keep_history: bool = True) -> dict:
    """One TCA prefill with every kernel and selection call timed; returns per-layer lists."""
    calls, repeated, selects = e2e.AttentionTimer(), e2e.AttentionTimer(), e2e.AttentionTimer()
    original_kernel, original_select = launchers.sparse_prefill, ops.select
    kernel_call, kernel_repeat = calls.wrap(original_kernel), repeated.wrap(original_kernel)
    widths, last = [], {}

    def timed_kernel(*args):
        if drain:
            torch.cuda.synchronize()
        out = kernel_call(*args)
        for _ in range(repeats):
            kernel_repeat(*args)
        widths.append(int(args[3].indices.shape[-1]))
        last["args"] = args
        return out

    launchers.sparse_prefill, ops.select = timed_kernel, selects.wrap(original_select)
    try:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        with Clocks() as clocks, torch.no_grad(), tca.apply(model, profile, keep_history=keep_history):
            model(ids, logits_to_keep=1)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - begin) * 1e3
    finally:
        launchers.sparse_prefill, ops.select = original_kernel, original_select
    repeat_ms = _ms(repeated)
    return dict(
        wall=wall,
        kernel=_ms(calls),
        select=_ms(selects),
        reruns=[repeat_ms[i : i + repeats] for i in range(0, len(repeat_ms), repeats)] if repeats else [],
        widths=widths,
        clocks=clocks.summary,
        last=last.get("args"),
    )


def _ms(timer) -> list[float]:
    """Each timed call's milliseconds, in call order (after the forward has synchronised)."""
    return [start.elapsed_time(end) for start, end in timer.pairs]


def report(name: str, run: dict) -> None:
    """One line of totals and the per-layer kernel times."""
    kernel, select = run["kernel"], run["select"]
    line = (
        f"{name}: wall {run['wall']:.0f} ms; kernel sum {sum(kernel):.0f} ms (per layer median "
        f"{statistics.median(kernel):.2f}, min {min(kernel):.2f}, max {max(kernel):.2f}); "
        f"select sum {sum(select):.1f} ms; widths {sorted(set(run['widths']))}"
    )
    if run["reruns"]:
        flat = [x for pairs in run["reruns"] for x in pairs]
        line += f"; repeats median {statistics.median(flat):.2f} min {min(flat):.2f} max {max(flat):.2f}"
    print(line, flush=True)
    print(f"   clocks: {run['clocks']}", flush=True)
    print(f"   per layer: {[round(x, 1) for x in kernel]}", flush=True)
    if run["reruns"]:
        print(f"   repeats:   {[round(p[0], 1) for p in run['reruns']]}", flush=True)


def main(length: int) -> None:
    started = time.time()
    model = e2e.random_model(e2e.model_config("llama-3.1-8b", length + 512), "cuda")
    ids = torch.randint(3, 128000, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
    profile = e2e.uniform_profile(model, 0.1, length)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, length {length}", flush=True)
    forward(model, ids, profile, drain=False, repeats=0)  # warm-up: compiles, allocates
    print(f"built and warmed in {time.time() - started:.0f} s", flush=True)
    with Clocks() as idle:
        time.sleep(0.5)
    print(f"idle clocks: {idle.summary}", flush=True)
    runs = {
        "as the model runs": dict(drain=False, repeats=0),
        "drained, 2 repeats": dict(drain=True, repeats=2),
        "as the model runs, again": dict(drain=False, repeats=0),
        "no host history": dict(drain=False, repeats=0, keep_history=False),
    }
    for name, options in runs.items():
        run = forward(model, ids, profile, **options)
        report(name, run)
        last = run["last"]
    with Clocks() as clocks:
        alone = time_ms(lambda: launchers.sparse_prefill(*last))
    print(f"last layer's call alone (graph): {alone:.2f} ms; {clocks.summary}", flush=True)
    with Clocks() as clocks:
        eager = time_ms(lambda: launchers.sparse_prefill(*last), graph=False)
    print(f"last layer's call alone (eager): {eager:.2f} ms; {clocks.summary}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
