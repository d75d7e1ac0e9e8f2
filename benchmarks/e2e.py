"""End-to-end speed and memory of what a user runs: ``model.generate()`` inside ``tca.apply`` with
the library's defaults, against dense SDPA in the same process, on the GPU.

    python benchmarks/e2e.py                                   # the grid of the README, Llama-3.1-8B
    python benchmarks/e2e.py --lengths 32768 --kept 0.1 --new-tokens 16     # a quick look
    python benchmarks/e2e.py --shape path/to/config.json       # any local model configuration
    python benchmarks/e2e.py --shape gemma3-270m --lengths 32768 \
        --profile src/tca/data/profiles/gemma3-270m.json     # a profile file's budgets and options

The model is built from its configuration with RANDOM bf16 weights (no checkpoint is read): speed
does not depend on the weight values once the kept sets are fixed. TCA runs a uniform profile
(every KV head the same configuration, ``sigma`` 1) whose nominal kept share of the candidates
(the keys outside the final window) is the target, as ``benchmarks/attention.py`` builds its
kept sets; every other setting is ``TCAConfig.for_model``'s default, history kept (the default).
With ``--profile`` the TCA rows run that profile file instead (its budgets and its configuration:
what a user of that profile runs, a bundled one say), one row per case, ``kept_target`` null.

Per (length, batch, kept target, mode) a row: ``ttft_ms`` (prompt in, first token out: the prefill
and the first sampling step; on the dense and TCA rows the median of up to five generates, as many
as fit in 2 s, ``ttft_ms_runs``: five at 8K, one from 32K on), ``decode_ms_per_token`` (mean over
the next tokens), ``peak_gib`` (peak allocated GPU memory during the generate), ``kv_bytes`` (device
KV cache after it), ``kept_fraction`` / ``pairs_fraction`` (``run.stats``), ``attention_ms``
(prefill attention alone, summed over every layer, timed with CUDA events in a separate pass: SDPA
for dense; for TCA selection + sparse attention, and on the layers it does not manage (sliding-window
ones) their window kernel or SDPA; files up to ``e2e-gemma3-270m-bundled-window-kernel-*.json``
timed the managed layers only, so on Gemma 3 their TCA figure leaves out 15 of 18 layers),
``amdahl_ttft_ms`` = dense ttft - dense attention +
TCA attention (what TCA's first token would cost if the integration cost nothing), and
``host_syncs_per_token`` (synchronisations made by tca code per decode step, counted with
``torch.cuda.set_sync_debug_mode``; for dense: by the whole generate loop). Timings are wall-clock
with the device synchronised; ``decode_ms_median`` is the median step (a one-off compilation or
graph capture does not move it).

On a CUDA device the defaults replay TCA's decode steps from a CUDA graph (``cuda_graphs``, on
wherever it serves; captured at the second decode step, inside the timed run); rows say so in
``cuda_graphs``. ``first_call_ttft_ms``: the first generate at a length and kept target, before the
timed one (its host history pins new memory and its selection's widths compile new kernel variants;
later calls reuse both); dense too gets one untimed generate at each length first (the files up to
``e2e-nvidia-h200-8k-64k.json`` timed dense's first generate there: their dense eager decode reads
57-63 ms a token at 32K-128K where ``benchmarks/tp.py``'s warmed runs at one GPU read 25 ms; the
cause is not established). With ``--graphs`` two more modes per case: ``dense-graph``, dense with
transformers' static cache, whose decode step ``generate`` compiles (torch.compile with CUDA graphs;
one untimed warm-up generate compiles it), and ``tca-eager``, TCA with ``cuda_graphs=False`` (every
decode step run eagerly, in Python).

With ``--turns``: ``next_turn_ttft_ms``, the time to the first token of a second turn (64 new
tokens after the first answer, on the same cache; TCA with its host history selects again from
the whole conversation; timed on the second of two conversations, since the first compiles the
new turn's kernels: files up to ``e2e-nvidia-h200.json`` at 9be4535 timed the first), on the dense
and TCA rows, and a ``tca-no-history`` row
(``keep_history=False``): the first turn's cost of the history, and a second turn read from the
compressed cache alone.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
import warnings
from math import nan
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DynamicCache, LogitsProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import tca
import tca.ops as ops
from tca.core.budgets import mu_for_share
from tca.core.config import TCAConfig
from tca.core.profile import Profile
from tca.eval.provenance import device_name, provenance
from tca.integrations.transformers import registration
from tca.integrations.transformers.cache import dense_cache_bytes

RESULTS = Path(__file__).parent / "results"
FOLLOW_UP = 64  # tokens of the second turn's question (--turns)
TTFT_BUDGET_S = 2.0  # first-token generates per dense and TCA row: as many as fit, five at most
SHAPES = {
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
    ),
    # Gemma 3 270M: 15 sliding-window layers (512 tokens) that TCA leaves alone, full layers 5, 11, 17
    "gemma3-270m": dict(
        model_type="gemma3_text",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        vocab_size=262144,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by the tests for every committed result's command)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help=f"{', '.join(SHAPES)} or a config.json path")
    parser.add_argument("--lengths", default="8192,32768,65536,131072,262144")
    parser.add_argument("--kept", default="0.05,0.1,0.2", help="kept share targets of the uniform profile")
    parser.add_argument(
        "--batch4-length", type=int, default=32768, help="also batch 4 at this length (0: no)"
    )
    parser.add_argument(
        "--profile", default=None, help="a profile file for the TCA rows (instead of uniform ones at --kept)"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after the first token")
    parser.add_argument("--graphs", action="store_true", help="also modes dense-graph and tca-eager")
    parser.add_argument(
        "--turns", action="store_true", help="also a second turn's ttft, and TCA without host history"
    )
    parser.add_argument("--out", default=None, help="JSON path (default results/e2e-<device>.json)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on a tiny config)")
    parser.add_argument(
        "--plot-only", nargs="+", metavar="JSON", help="draw the speed-ups of these results; no run"
    )
    return parser


def model_config(shape: str, longest: int, shapes: dict[str, dict] = SHAPES):
    """The configuration of ``shape`` (a name in ``shapes`` or a config.json path), its position
    limit raised to ``longest`` where needed."""
    if shape in shapes:
        fields = dict(shapes[shape])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        config = AutoConfig.from_pretrained(shape)
    config.max_position_embeddings = max(config.max_position_embeddings, longest)
    return config


def random_model(config, device: str) -> torch.nn.Module:
    """The model of ``config`` on ``device`` with random bf16 weights and SDPA attention, in eval mode."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def default_out(prefix: str, device: str) -> Path:
    """``results/<prefix>-<device>.json``, the device's name in lower case with dashes for spaces."""
    return RESULTS / f"{prefix}-{device.lower().replace(' ', '-')}.json"


def sync() -> None:
    """Wait for the current CUDA device (nothing on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock(LogitsProcessor):
    """Called after every forward of ``generate``: device-synchronised times of each step, and of
    the first step also the time its logits were ready on the model's stream (``stream_first``):
    what ``generate``'s caller waits for, without TCA's host-history copies on their side stream."""

    def __init__(self):
        self.times: list[float] = []
        self.stream_first: float | None = None

    def __call__(self, input_ids, scores):
        if not self.times and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
            self.stream_first = time.perf_counter()
        sync()
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, ids, new_tokens: int, **options) -> tuple[float, float, float, float, float]:
    """(ttft ms, decode ms per token (mean), its median, peak GiB, ttft ms on the model's stream) of
    one greedy generate of ``new_tokens + 1`` tokens; ``options`` go to ``generate``
    (``cache_implementation="static"``). The first ttft waits for the whole device, the last only for
    the stream that computed the logits (the same off a GPU)."""
    clock = Clock()
    sync()
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens + 1,
        min_new_tokens=new_tokens + 1,
        do_sample=False,
        logits_processor=[clock],
        pad_token_id=0,
        **options,
    )
    ttft = (clock.times[0] - start) * 1e3
    ttft_stream = ttft if clock.stream_first is None else (clock.stream_first - start) * 1e3
    decode = (clock.times[-1] - clock.times[0]) * 1e3 / max(len(clock.times) - 1, 1)
    steps = sorted(b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)) or [0.0]
    median = steps[len(steps) // 2] * 1e3
    return ttft, decode, median, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, ttft_stream


def first_token_ms(model, ids, first: float, budget_s: float = TTFT_BUDGET_S) -> tuple[float, list[float]]:
    """The median time to first token: ``first`` (a timed generate's) and first-token-only generates
    while the runs fit in ``budget_s``, five at most (short prompts get a median of five, 32K and
    longer prompts their one run). Returns (median ms, every run's ms)."""
    runs = [first]
    while len(runs) < 5 and (sum(runs) + runs[-1]) / 1e3 <= budget_s:
        runs.append(timed_generate(model, ids, 0)[0])
    return statistics.median(runs), runs


class AttentionTimer:
    """Sums the times of wrapped calls: CUDA events on the GPU (read after one synchronisation),
    the host clock elsewhere."""

    def __init__(self):
        self.pairs: list = []
        self.host_ms = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if not torch.cuda.is_available():
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                self.host_ms += (time.perf_counter() - start) * 1e3
                return out
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.pairs.append((start, end))
            return out

        return timed

    def total_ms(self) -> float:
        sync()
        return self.host_ms + sum(start.elapsed_time(end) for start, end in self.pairs)


def dense_attention_ms(model, ids) -> float:
    """Prefill attention time of dense SDPA over ``ids``, summed over layers."""
    timer = AttentionTimer()
    AttentionInterface.register("sdpa-timed", timer.wrap(sdpa_attention_forward))
    AttentionMaskInterface.register("sdpa-timed", sdpa_mask)
    model.set_attn_implementation("sdpa-timed")
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        model.set_attn_implementation("sdpa")
    return timer.total_ms()


def tca_attention_ms(model, profile, ids) -> float:
    """Prefill attention time under TCA over ``ids``, summed over every layer: selection + sparse
    attention on the managed layers, the window kernel or transformers' SDPA on the others."""
    timer = AttentionTimer()
    timed = [(ops, "select"), (ops, "sparse_prefill"), (ops, "window_prefill")]
    timed.append((registration, "sdpa_attention_forward"))  # the unmanaged layers' SDPA
    originals = [getattr(owner, name) for owner, name in timed]
    for (owner, name), original in zip(timed, originals, strict=True):
        setattr(owner, name, timer.wrap(original))
    try:
        with torch.no_grad(), tca.apply(model, profile):
            model(ids, logits_to_keep=1)
    finally:
        for (owner, name), original in zip(timed, originals, strict=True):
            setattr(owner, name, original)
    return timer.total_ms()


def syncs_per_token(model, ids, profile, steps: int, cuda_graphs: bool | None = None) -> float:
    """Synchronisations per decode step (steady state: the steps after the first token): by tca
    code under TCA (``cuda_graphs``: as ``tca.apply`` takes it), by anything in the generate loop for dense
    (``profile`` None)."""
    if ids.device.type != "cuda":
        return float("nan")

    def count(new_tokens: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate = model.generate
                generate(
                    ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
                )
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        return len([w for w in syncs if "/tca/" in w.filename] if profile is not None else syncs)

    if profile is None:
        return (count(1 + steps) - count(1)) / steps
    with tca.apply(model, profile, cuda_graphs=cuda_graphs):
        return (count(1 + steps) - count(1)) / steps


def uniform_profile(model, kept: float, context_len: int) -> Profile:
    """Every head keeping ``kept`` of the candidates, nominally, with the defaults of ``for_model``."""
    config = TCAConfig.for_model(model)
    n_cand = max(context_len - config.effective_window, 1)
    return Profile.uniform(model, config, mu_for_share(kept, n_cand, config.block_size), 1.0)


def measure(
    model,
    shape: str,
    length: int,
    batch: int,
    kept_targets,
    new_tokens: int,
    graphs=False,
    turns=False,
    profile_file: Profile | None = None,
) -> list[dict]:
    """Dense, then TCA at each kept target (or with ``profile_file``, once), on one random prompt
    batch; with ``graphs`` also
    dense with transformers' static cache (whose decode ``generate`` compiles: torch.compile, CUDA
    graphs) and TCA with ``cuda_graphs=False``; with ``turns`` a second turn's time to first token
    and TCA without the host history (``tca-no-history``)."""
    generator = torch.Generator().manual_seed(length + batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator).to(model.device)
    dense_kv = dense_cache_bytes(model, length + new_tokens, batch)  # sliding layers: their window
    timed_generate(model, ids, new_tokens)  # untimed, as TCA's first call at a length
    ttft, decode, median, peak, _ = timed_generate(model, ids, new_tokens)
    ttft, ttft_runs = first_token_ms(model, ids, ttft)
    dense_attention = dense_attention_ms(model, ids)
    base = dict(shape=shape, L=length, batch=batch, weights="random bf16")
    rows = [
        base
        | dict(
            mode="dense",
            kept_target=None,
            kept_fraction=1.0,
            pairs_fraction=1.0,
            ttft_ms=ttft,
            ttft_ms_runs=ttft_runs,
            decode_ms_per_token=decode,
            decode_ms_median=median,
            peak_gib=peak,
            kv_bytes=dense_kv,
            attention_ms=dense_attention,
            amdahl_ttft_ms=ttft,
        )
    ]
    dense_row = rows[0]
    if graphs:
        rows += dense_graph_row(model, ids, new_tokens, dense_row)
    if turns:
        dense_row["next_turn_ttft_ms"] = next_turn_ttft(model, ids, new_tokens, DynamicCache)
    if profile_file:
        profiles = [(None, profile_file)]
    else:
        profiles = [(kept, uniform_profile(model, kept, length)) for kept in kept_targets]
    for kept, profile in profiles:
        # the first generate at this length and kept target, not timed: new pinned memory for its
        # history, and the kernels compiled for this selection's widths
        first_call = tca_generate(model, ids, profile, 1, repeat=False)[0][0]
        (ttft_tca, decode_tca, median_tca, peak_tca), stats = tca_generate(model, ids, profile, new_tokens)
        attention = tca_attention_ms(model, profile, ids)
        tca_row = (
            base
            | stats
            | dict(
                mode="tca",
                kept_target=kept,
                ttft_ms=ttft_tca,
                first_call_ttft_ms=first_call,
                decode_ms_per_token=decode_tca,
                decode_ms_median=median_tca,
                peak_gib=peak_tca,
                attention_ms=attention,
                amdahl_ttft_ms=ttft - dense_attention + attention,
                config=profile.config.to_dict(),
                ttft_speedup=ttft / ttft_tca,
                decode_speedup=decode / decode_tca,
            )
        )
        rows.append(tca_row)
        if graphs:  # the same with every decode step run eagerly (no CUDA graph)
            (ttft_e, decode_e, median_e, peak_e), _ = tca_generate(
                model, ids, profile, new_tokens, cuda_graphs=False
            )
            eager = dict(ttft_ms=ttft_e, decode_ms_per_token=decode_e, decode_ms_median=median_e)
            eager |= dict(peak_gib=peak_e, first_call_ttft_ms=None, cuda_graphs=False)
            rows.append(tca_row | eager | dict(mode="tca-eager"))
        if turns:
            with tca.apply(model, profile) as run:
                tca_row["next_turn_ttft_ms"] = next_turn_ttft(model, ids, new_tokens, run.new_cache)
            del run  # its cache and host history go before the next row
            rows.append(no_history_row(model, ids, profile, new_tokens, tca_row))
    return rows


def tca_generate(model, ids, profile, new_tokens: int, repeat: bool = True, **options) -> tuple[tuple, dict]:
    """``timed_generate`` inside ``tca.apply(model, profile, **options)``, and the run's statistics.
    The run (its cache, its pinned host history) is gone when this returns, so every row starts
    from the same state: the caching host allocator holds the pinned blocks for the next one."""
    with tca.apply(model, profile, **options) as run:
        ttft, *rest = timed_generate(model, ids, new_tokens)
        ttft, runs = first_token_ms(model, ids, ttft) if repeat else (ttft, [ttft])
        timings = (ttft, *rest[:3])  # (ttft, decode, median, peak)
        stats = dict(
            ttft_ms_runs=runs,
            kept_fraction=run.stats.kept_fraction,
            pairs_fraction=run.stats.pairs_fraction,
            kv_bytes=run.stats.kv_bytes,
            host_kv_bytes=run.stats.host_kv_bytes,
            cuda_graphs=run.cuda_graphs,
        )
    return timings, stats


def next_turn_ttft(model, ids, new_tokens: int, new_cache) -> float:
    """ms to the first token of a second turn on a cache from ``new_cache()``: a first generate of
    ``new_tokens`` tokens after ``ids``, then ``FOLLOW_UP`` new tokens (TCA with its history selects
    again from all of it). Timed on the second of two conversations (the first compiles the new
    turn's kernels)."""
    kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    generator = torch.Generator().manual_seed(1)
    follow_up = torch.randint(3, model.config.vocab_size, (ids.shape[0], FOLLOW_UP), generator=generator)
    for _ in range(2):
        cache = new_cache()
        with torch.no_grad():
            first = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **{kwarg: cache},
            )  # fmt: skip
        ttft, *_ = timed_generate(model, torch.cat([first, follow_up.to(ids.device)], 1), 0, **{kwarg: cache})
        del cache, first
    return ttft


def no_history_row(model, ids, profile, new_tokens: int, tca_row: dict) -> dict:
    """TCA with ``keep_history=False``: what the default host history costs (the first turn), and
    the second turn read from the compressed cache alone."""
    with tca.apply(model, profile, keep_history=False) as run:
        ttft, decode, median, peak, _ = timed_generate(model, ids, new_tokens)
        host = run.stats.host_kv_bytes
        next_turn = next_turn_ttft(model, ids, new_tokens, run.new_cache)
    timings = dict(ttft_ms=ttft, decode_ms_per_token=decode, decode_ms_median=median, peak_gib=peak)
    return tca_row | timings | dict(mode="tca-no-history", host_kv_bytes=host, next_turn_ttft_ms=next_turn)


def dense_graph_row(model, ids, new_tokens: int, dense: dict) -> list[dict]:
    """Dense with transformers' static cache, whose decode step ``generate`` compiles (torch.compile
    with CUDA graphs on a GPU): one warm-up generate (the compilation), then the timed one. No row,
    with the error printed, when this transformers cannot compile it."""
    try:
        timed_generate(model, ids, new_tokens, cache_implementation="static")
        ttft, decode, median, peak, _ = timed_generate(model, ids, new_tokens, cache_implementation="static")
    except Exception as error:  # noqa: BLE001 (a benchmark row, not a library path)
        print(f"dense-graph at L={ids.shape[1]}: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return []
    timings = dict(ttft_ms=ttft, decode_ms_per_token=decode, decode_ms_median=median, amdahl_ttft_ms=ttft)
    return [dense | timings | dict(mode="dense-graph", peak_gib=peak)]


def print_table(rows: list[dict]) -> None:
    print("shape L batch mode kept | ttft_ms (amdahl) decode_ms peak_gib kv_GiB syncs/token")
    for r in rows:
        print(
            f"{r['shape']} {r['L']} {r['batch']} {r['mode']} {r['kept_target']} | {r['ttft_ms']:.0f} "
            f"({r['amdahl_ttft_ms']:.0f}) {r['decode_ms_per_token']:.1f} {r['peak_gib']:.1f} "
            f"{r['kv_bytes'] / 2**30:.2f} {r['host_syncs_per_token']:.2f}"
        )


def plot(paths: list[str], out_png: Path) -> None:
    """Time-to-first-token and decode speed-ups over dense (batch 1) against length, per kept target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {
        (r["L"], r["kept_target"]): r
        for p in paths
        for r in json.loads(Path(p).read_text())["rows"]
        if r["batch"] == 1 and r["mode"] in ("dense", "tca")  # the library's defaults
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, key, title in zip(
        axes,
        ("ttft_ms", "decode_ms_per_token"),
        ("time to first token", "decode per token (CUDA graph, the default on a GPU)"),
        strict=True,
    ):
        for kept in sorted({k for _, k in rows if k is not None}):
            lengths = sorted(length for length, k in rows if k == kept and (length, None) in rows)
            if key == "decode_ms_per_token":  # today's default decode only (older rows decoded eagerly)
                lengths = [n for n in lengths if rows[n, kept].get("cuda_graphs")]
            ax.plot(
                lengths,
                [rows[n, None][key] / rows[n, kept][key] for n in lengths],
                "o-",
                label=f"TCA {kept:.0%} kept",
            )
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="dense")
        ax.set(xscale="log", xlabel="context tokens", ylabel="speed-up over dense (x)", title=title)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    axes[0].legend(fontsize=8)
    fig.suptitle("generate() under tca.apply, defaults, Llama-3.1-8B shapes, one H200")
    fig.savefig(out_png, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        plot(args.plot_only, Path(args.plot_only[0]).with_suffix(".png"))
        return
    lengths = [int(x) for x in args.lengths.split(",") if x]
    kept = [float(x) for x in args.kept.split(",") if x]
    cases = [(length, 1) for length in lengths]
    if args.batch4_length:
        cases.append((args.batch4_length, 4))
    config = model_config(args.shape, max(8192, *(length for length, _ in cases)) + args.new_tokens + 256)
    model = random_model(config, args.device)
    name = Path(args.shape).stem if args.shape not in SHAPES else args.shape
    device = device_name(args.device)
    out = Path(args.out) if args.out else default_out("e2e", device)
    profile = Profile.load(args.profile) if args.profile else None
    resolved = vars(args) | {
        "tca": (profile.config if profile else TCAConfig.for_model(model)).to_dict(),
        "profile": args.profile or "uniform, sigma 1",
    }
    record = provenance(args.device, resolved) | dict(shape=name, model_config=config.to_dict(), rows=[])
    record["note"] = (
        "random bf16 weights: speed does not depend on the weight values once the kept sets are fixed"
    )
    # warm-up: Triton compilation and cuBLAS/cuDNN handles stay out of the timed runs
    measure(model, name, 8192, 1, kept[:1], 2, args.graphs, profile_file=profile)
    # synchronisations per decode step, over more than one block-compression event (block + 8 steps)
    warm = torch.randint(3, config.vocab_size, (1, 8192), generator=torch.Generator().manual_seed(0)).to(
        model.device
    )
    block = TCAConfig.for_model(model).block_size
    syncs = {
        "dense": syncs_per_token(model, warm, None, block + 8),
        "tca": syncs_per_token(model, warm, uniform_profile(model, 0.1, 8192), block + 8),
    }
    if args.graphs:
        syncs["tca-eager"] = syncs_per_token(model, warm, uniform_profile(model, 0.1, 8192), block + 8, False)
        syncs["dense-graph"] = nan  # not counted (its compiled step)
    record["host_syncs_per_token"] = syncs | {"prompt": 8192, "steps": block + 8}
    for length, batch in tqdm(cases, desc="e2e", unit="case"):
        try:
            targets = kept if batch == 1 else [0.1]
            rows = measure(
                model, name, length, batch, targets, args.new_tokens, args.graphs, args.turns, profile
            )
        except torch.OutOfMemoryError as error:
            print(f"L={length} batch={batch}: out of memory ({str(error)[:120]})", flush=True)
            torch.cuda.empty_cache()
            continue
        record["rows"] += [row | {"host_syncs_per_token": syncs.get(row["mode"], nan)} for row in rows]
        print_table(record["rows"][-len(rows) :])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))  # after every case: an interrupted run keeps its rows
    print_table(record["rows"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
