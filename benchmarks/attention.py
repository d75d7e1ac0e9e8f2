"""Per-layer attention timings on the GPU: TCA (selection + sparse prefill, and compressed-cache
decode) against dense SDPA and FlexAttention with the equivalent block mask, in one process.

    python benchmarks/attention.py                      # full grid, writes the JSON and the plot
    python benchmarks/attention.py --lengths 8192 --fractions 0.1 --no-flex   # a quick look
    python benchmarks/attention.py --plot-only benchmarks/results/attention-<device>.json

Kept sets: the real selection kernel on random inputs (B=1, bf16), every KV head with the same
configuration ``(mu, sigma=1.0)``, ``mu`` found by bisection so that the nominal kept share of
the candidates (keys outside the final window) is the target fraction; ``kept_fraction`` in the
output is the share the selection actually kept. Random keys give near-uniform importance, so
the kept tokens spread over every block: the hard case for block-sparse baselines.

Definitions (issue 6): ``pairs_fraction`` = TCA query-key pairs / dense causal pairs, counted
from the indices; ``efficiency`` = dense_ms * pairs_fraction / attention_ms; ``tca_ms`` =
selection_ms + attention_ms; ``speedup`` = dense_ms / tca_ms. ``attention_ms`` is the dispatched
path (``tca.ops.sparse_prefill``: dense past the crossover), ``kernel_ms`` the sparse kernel
alone. Decode rows: a cache of the kept tokens plus the window per KV head; ``pairs_fraction``
is then the share of dense's K/V bytes read, and ``efficiency`` = (bytes read / dense decode's
bandwidth) / attention_ms. Timing: CUDA events after warm-up, median of repeats; decode and
selection are captured in a CUDA graph (many small launches), prefill runs eagerly.
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that made them)
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import tca.ops as ops
from tca.core.budgets import mu_for_share
from tca.core.config import TCAConfig
from tca.eval.provenance import provenance
from tca.ops.triton import DENSE_CROSSOVER, launchers

SHAPES = {
    # heads, kv heads, head dim, window, block (TCAConfig.for_model for each model)
    "llama-3.1-8b": dict(n_heads=32, n_kv=8, head_dim=128, window=4096, block=128),
    "smollm2-135m": dict(n_heads=9, n_kv=3, head_dim=64, window=512, block=64),
}
RESULTS = Path(__file__).parent / "results"


def time_ms(fn, graph: bool = True, budget_ms: float = 400.0) -> float:
    """Median milliseconds of one call of ``fn`` (CUDA events) after warm-up.

    ``graph``: capture the call in a CUDA graph and time its replays, so the host-side work of
    the launch (Python, argument checks, small index ops) does not count: what a model run
    under CUDA graphs, or one whose CPU runs ahead of the GPU, sees. Calls too short to time
    alone are repeated back to back between the events.
    """
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    inner = max(1, int(1.0 / once))  # at least ~1 ms between the events
    repeats = int(min(50, max(5, budget_ms / (once * inner))))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def exact_pairs_fraction(selection, context_len: int, window: int) -> float:
    """TCA pairs / dense causal pairs: kept key k is seen by queries j >= k + w; query j sees
    min(w, j + 1) window keys. Averaged over KV heads (every query head of a group alike)."""
    n_kv = selection.indices.shape[1]
    valid = (
        torch.arange(selection.indices.shape[-1], device=selection.indices.device)
        < selection.counts[..., None]
    )
    kept_pairs = ((context_len - window - selection.indices).clamp_min(0) * valid).sum().item()
    j = torch.arange(context_len, dtype=torch.float64)
    window_pairs = torch.clamp(j + 1, max=window).sum().item() * n_kv
    dense = context_len * (context_len + 1) / 2 * n_kv
    return (kept_pairs + window_pairs) / dense


def flex_block_mask(selection, shape: dict, context_len: int, device):
    """FlexAttention mask of exactly TCA's pattern, its block layout built from the kept set:
    a 128x128 tile is computed when it holds a window pair or a visible kept key."""
    from torch.nn.attention.flex_attention import BlockMask

    n_kv, group, window, tile = shape["n_kv"], shape["n_heads"] // shape["n_kv"], shape["window"], 128
    kept = torch.zeros(n_kv, context_len + 1, dtype=torch.bool, device=device)
    kept.scatter_(1, selection.indices[0].clamp_max(context_len), True)
    kept = kept[:, :context_len].contiguous()
    n_tiles = math.ceil(context_len / tile)
    tile_has_kept = (
        torch.nn.functional.pad(kept, (0, n_tiles * tile - context_len)).view(n_kv, n_tiles, tile).any(-1)
    )
    qi = torch.arange(n_tiles, device=device).view(-1, 1)
    kj = torch.arange(n_tiles, device=device).view(1, -1)
    q_first, q_last, k_first, k_last = qi * tile, qi * tile + tile - 1, kj * tile, kj * tile + tile - 1
    any_window = (k_first <= q_last) & (k_last > q_first - window)
    full = (k_last <= q_first) & (k_first > q_last - window)
    any_kept = tile_has_kept[:, None, :] & (k_first <= q_last - window)  # (G, nq, nk)
    partial = (any_window & ~full) | (any_kept & ~full)

    def layout(mask):  # (G, nq, nk) -> counts (1, H, nq), indices (1, H, nq, nk), visible tiles first
        mask = mask.expand(n_kv, -1, -1).repeat_interleave(group, 0)[None]
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return mask.sum(-1).to(torch.int32), order

    def mask_mod(b, h, q_idx, kv_idx):
        seen_kept = kept[h // group, kv_idx] & (kv_idx <= q_idx - window)
        return (kv_idx <= q_idx) & ((kv_idx > q_idx - window) | seen_kept)

    counts, indices = layout(partial)
    full_counts, full_indices = layout(full[None])
    return BlockMask.from_kv_blocks(
        counts,
        indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=tile,
        mask_mod=mask_mod,
        seq_lengths=(context_len, context_len),
    )


def prefill_rows(name: str, shape: dict, context_len: int, fractions, use_flex: bool, flex) -> list[dict]:
    device = torch.device("cuda")
    n_heads, n_kv, dim = shape["n_heads"], shape["n_kv"], shape["head_dim"]
    q = torch.randn(1, n_heads, context_len, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, n_kv, context_len, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, n_kv, context_len, dim, device=device, dtype=torch.bfloat16)
    scale = dim**-0.5
    config = TCAConfig(local_window=shape["window"], block_size=shape["block"])
    dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    q1, k1, v1 = q[:, :, -1:], k[:, :, :context_len], v
    dense_decode_ms = time_ms(lambda: F.scaled_dot_product_attention(q1, k1, v1, enable_gqa=True))
    dense_bw = 2 * k.numel() * k.element_size() / (dense_decode_ms * 1e-3)
    n_cand = context_len - config.effective_window
    rows = []
    for fraction in fractions:
        mu = torch.full((n_kv,), mu_for_share(fraction, n_cand, shape["block"]), dtype=torch.float64)
        sigma = torch.ones(n_kv, dtype=torch.float64)
        observed = q[:, :, -1:]
        selection = launchers.select(observed, k, mu, sigma, config, scale)
        selection_ms = time_ms(
            lambda: launchers.select(observed, k, mu, sigma, config, scale),
        )
        kept_fraction = selection.counts.sum().item() / (n_kv * max(n_cand, 1))
        pairs = exact_pairs_fraction(selection, context_len, config.effective_window)
        window = config.effective_window
        kernel_ms = time_ms(lambda: launchers.sparse_prefill(q, k, v, selection, window, scale))
        attention_ms = time_ms(lambda: ops.sparse_prefill(q, k, v, selection, window, scale))
        flex_ms = None
        if use_flex:
            try:
                mask = flex_block_mask(selection, shape, context_len, device)
                flex_ms = time_ms(
                    lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True), graph=False
                )
            except Exception as error:  # the baseline failing must not lose the other numbers
                print(f"flex failed at {name} L={context_len}: {error!r}"[:300], file=sys.stderr)
        tca_ms = selection_ms + attention_ms
        rows.append(
            dict(
                phase="prefill",
                shape=name,
                L=context_len,
                kept_fraction=round(kept_fraction, 4),
                target_fraction=fraction,
                pairs_fraction=round(pairs, 4),
                dense_ms=dense_ms,
                flex_ms=flex_ms,
                selection_ms=selection_ms,
                attention_ms=attention_ms,
                kernel_ms=kernel_ms,
                tca_ms=tca_ms,
                efficiency=dense_ms * pairs / attention_ms,
                kernel_efficiency=dense_ms * pairs / kernel_ms,
                speedup=dense_ms / tca_ms,
                dispatched="sparse"
                if attention_ms_is_sparse(selection, context_len, window, dim)
                else "dense",
            )
        )
        rows.append(decode_row(name, shape, context_len, fraction, selection, q, dense_decode_ms, dense_bw))
        print(json.dumps(rows[-2]), flush=True)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_ms_is_sparse(selection, context_len: int, window: int, head_dim: int) -> bool:
    return ops.sparse_pays(context_len, window, selection.indices.shape[-1], head_dim)


def decode_row(name, shape, context_len, fraction, selection, q, dense_ms, dense_bw) -> dict:
    """One decode step over the compressed cache: kept tokens plus the window, per KV head."""
    n_kv, dim, window = shape["n_kv"], shape["head_dim"], shape["window"]
    lengths = (selection.counts + min(window, context_len)).to(torch.int32)  # (1, G)
    max_len = int(lengths.max())
    cache_k = torch.randn(1, n_kv, max_len, dim, device=q.device, dtype=torch.bfloat16)
    cache_v = torch.randn(1, n_kv, max_len, dim, device=q.device, dtype=torch.bfloat16)
    q1 = q[:, :, -1:].contiguous()
    decode_ms = time_ms(lambda: ops.decode(q1, cache_k, cache_v, lengths))
    read = 2 * lengths.sum().item() * dim * cache_k.element_size()
    dense_bytes = 2 * n_kv * context_len * dim * cache_k.element_size()
    return dict(
        phase="decode",
        shape=name,
        L=context_len,
        kept_fraction=round(selection.counts.sum().item() / (n_kv * max(context_len - window, 1)), 4),
        target_fraction=fraction,
        pairs_fraction=round(read / dense_bytes, 4),
        dense_ms=dense_ms,
        flex_ms=None,
        selection_ms=0.0,
        attention_ms=decode_ms,
        tca_ms=decode_ms,
        efficiency=read / dense_bw * 1e3 / decode_ms,
        speedup=dense_ms / decode_ms,
        bandwidth_tb_s=read / (decode_ms * 1e-3) / 1e12,
        dense_bandwidth_tb_s=dense_bw / 1e12,
    )


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    shapes = sorted({r["shape"] for r in data["rows"]})
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for col, shape in enumerate(shapes):
        for row, phase in enumerate(("prefill", "decode")):
            ax = axes[row][col]
            rows = [r for r in data["rows"] if r["shape"] == shape and r["phase"] == phase]
            for fraction in sorted({r["target_fraction"] for r in rows}):
                sel = sorted((r for r in rows if r["target_fraction"] == fraction), key=lambda r: r["L"])
                ax.plot(
                    [r["L"] for r in sel],
                    [r["speedup"] for r in sel],
                    marker="o",
                    label=f"TCA {fraction:.0%} kept",
                )
            flex = sorted(
                (r for r in rows if r.get("flex_ms") and r["target_fraction"] == 0.1), key=lambda r: r["L"]
            )
            if flex:
                ax.plot(
                    [r["L"] for r in flex],
                    [r["dense_ms"] / r["flex_ms"] for r in flex],
                    "k--",
                    marker="x",
                    label="FlexAttention, 10% kept",
                )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{shape} {phase}: speed-up over dense SDPA ({data['device']})", fontsize=9)
            ax.set_xlabel("context length L")
            ax.set_ylabel("dense_ms / tca_ms")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def use_prefill_tiles(rows: int, block_n: int, warps: int, stages: int) -> None:
    """Make the CUDA prefill kernel run with these tiles (rows per program, keys per tile, warps,
    pipeline stages) from now on in this process."""
    launchers.PREFILL_ROWS["cuda"], launchers.PREFILL_BLOCK_N["cuda"] = rows, block_n
    launchers.PREFILL_WARPS, launchers.PREFILL_STAGES["cuda"] = warps, stages


def sweep() -> None:
    """Prefill kernel block shapes at Llama shapes, 32K, 10% kept: (rows, keys per tile, warps, stages)."""
    shape = SHAPES["llama-3.1-8b"]
    context_len, device = 32768, torch.device("cuda")
    q = torch.randn(1, shape["n_heads"], context_len, shape["head_dim"], device=device, dtype=torch.bfloat16)
    k = torch.randn(1, shape["n_kv"], context_len, shape["head_dim"], device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    config = TCAConfig(local_window=shape["window"], block_size=shape["block"])
    n_cand = context_len - shape["window"]
    mu = torch.full((shape["n_kv"],), mu_for_share(0.1, n_cand, shape["block"]), dtype=torch.float64)
    selection = launchers.select(q[:, :, -1:], k, mu, torch.ones_like(mu), config, shape["head_dim"] ** -0.5)
    pairs = exact_pairs_fraction(selection, context_len, shape["window"])
    dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    print(f"sweep: dense {dense_ms:.3f} ms, pairs {pairs:.3f}")
    best = (math.inf, None)
    for rows, block_n, warps, stages in [
        (256, 64, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (128, 32, 4, 4),
        (64, 128, 4, 2),
    ]:
        use_prefill_tiles(rows, block_n, warps, stages)
        try:
            ms = time_ms(
                lambda: launchers.sparse_prefill(
                    q, k, v, selection, shape["window"], shape["head_dim"] ** -0.5
                )
            )
            print(
                f"sweep rows={rows} block_n={block_n} warps={warps} stages={stages}: {ms:.3f} ms, "
                f"efficiency {dense_ms * pairs / ms:.2f}",
                flush=True,
            )
            best = min(best, (ms, (rows, block_n, warps, stages)))
        except Exception as error:
            print(f"sweep {rows},{block_n},{warps},{stages} failed: {error!r}"[:200], flush=True)
    rows, block_n, warps, stages = best[1]
    use_prefill_tiles(rows, block_n, warps, stages)
    print(f"sweep: using rows={rows} block_n={block_n} warps={warps} stages={stages}", flush=True)
    sweep_decode()


def sweep_decode() -> None:
    """Decode split shapes at Llama shapes, 128K compressed to 10% (+ window); keeps the best."""
    shape, device = SHAPES["llama-3.1-8b"], torch.device("cuda")
    n_kv, dim = shape["n_kv"], shape["head_dim"]
    lengths = torch.randint(13000, 13200, (1, n_kv), device=device, dtype=torch.int32) + shape["window"]
    max_len = int(lengths.max())
    cache_k = torch.randn(1, n_kv, max_len, dim, device=device, dtype=torch.bfloat16)
    cache_v = torch.randn_like(cache_k)
    q1 = torch.randn(1, shape["n_heads"], 1, dim, device=device, dtype=torch.bfloat16)
    read = 2 * lengths.sum().item() * dim * 2
    best = (math.inf, None)
    for per_sm, block_n, warps, stages in [(2, 64, 4, 3), (4, 64, 4, 3), (4, 128, 4, 3), (8, 64, 4, 2),
                                           (4, 64, 8, 4), (2, 128, 8, 3), (8, 32, 2, 3)]:  # fmt: skip
        launchers.DECODE_PROGRAMS_PER_SM, launchers.DECODE_BLOCK_N["cuda"] = per_sm, block_n
        launchers.DECODE_WARPS, launchers.DECODE_STAGES = warps, stages
        ms = time_ms(lambda: launchers.decode(q1, cache_k, cache_v, lengths))
        config = f"per_sm={per_sm} block_n={block_n} warps={warps} stages={stages}"
        print(f"sweep decode {config}: {ms * 1e3:.1f} us, {read / ms / 1e9:.2f} TB/s", flush=True)
        best = min(best, (ms, (per_sm, block_n, warps, stages)))
    per_sm, block_n, warps, stages = best[1]
    launchers.DECODE_PROGRAMS_PER_SM, launchers.DECODE_BLOCK_N["cuda"] = per_sm, block_n
    launchers.DECODE_WARPS, launchers.DECODE_STAGES = warps, stages
    print(f"sweep decode: using per_sm={per_sm} block_n={block_n} warps={warps} stages={stages}", flush=True)


def resolved_config(args: argparse.Namespace) -> dict:
    """The options after defaults, the shapes timed, and the kernel tuning the timings ran with
    (after ``--sweep``, the shapes it chose)."""
    return {
        "args": vars(args),
        "shapes": {name: SHAPES[name] for name in args.shapes.split(",")},
        "prefill_kernel": {
            "rows": launchers.PREFILL_ROWS["cuda"],
            "block_n": launchers.PREFILL_BLOCK_N["cuda"],
            "warps": launchers.PREFILL_WARPS,
            "stages": launchers.PREFILL_STAGES["cuda"],
        },
        "decode_kernel": {
            "programs_per_sm": launchers.DECODE_PROGRAMS_PER_SM,
            "block_n": launchers.DECODE_BLOCK_N["cuda"],
            "warps": launchers.DECODE_WARPS,
            "stages": launchers.DECODE_STAGES,
        },
        "dense_crossover": {str(k): v for k, v in DENSE_CROSSOVER.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--lengths", default="8192,32768,65536,131072")
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.4")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline")
    parser.add_argument("--flex-min-length", type=int, default=32768, help="FlexAttention only from this L")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/attention-<device>.json)"
    )
    parser.add_argument("--plot-only", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true", help="time prefill block shapes first, keep the best")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.plot_only:
        plot(args.plot_only)
        return
    if args.sweep:
        sweep()
    device_name = torch.cuda.get_device_name()
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
    rows = []
    for name in args.shapes.split(","):
        for context_len in map(int, args.lengths.split(",")):
            fractions = [float(f) for f in args.fractions.split(",")]
            use_flex = flex is not None and context_len >= args.flex_min_length
            rows += prefill_rows(name, SHAPES[name], context_len, fractions, use_flex, flex)
            torch.cuda.empty_cache()
    slug = device_name.lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or RESULTS / f"attention-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **provenance("cuda", config=resolved_config(args)),
        "timing": "CUDA-graph replays (FlexAttention eager), CUDA events, median after warm-up",
        "kept_sets": "real selection kernel on random bf16 inputs, mu bisected to the target fraction, "
        "sigma 1",
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1))
    try:
        plot(out)
    except ImportError:
        print("matplotlib missing: plot later with --plot-only", file=sys.stderr)
    print_table(rows)


def print_table(rows) -> None:
    print(
        f"{'phase':8}{'shape':14}{'L':>7}{'kept':>7}{'pairs':>7}{'dense':>9}{'flex':>9}{'sel':>8}"
        f"{'attn':>9}{'kern':>9}{'eff':>6}{'x':>6}"
    )
    for r in rows:
        flex = f"{r['flex_ms']:9.3f}" if r.get("flex_ms") else f"{'-':>9}"
        kern = f"{r['kernel_ms']:9.3f}" if "kernel_ms" in r else f"{'-':>9}"
        print(
            f"{r['phase']:8}{r['shape']:14}{r['L']:7d}{r['kept_fraction']:7.3f}{r['pairs_fraction']:7.3f}"
            f"{r['dense_ms']:9.3f}{flex}{r['selection_ms']:8.3f}{r['attention_ms']:9.3f}{kern}"
            f"{r['efficiency']:6.2f}{r['speedup']:6.2f}"
        )


if __name__ == "__main__":
    main()
