"""Tensor-parallel speed and memory of ``model.generate()`` inside ``tca.apply`` against dense SDPA,
one world size per command, under ``torchrun`` and transformers' tensor parallelism.

    torchrun --standalone --nproc_per_node 1 benchmarks/tp.py --out benchmarks/results/tp-nvidia-h200.json
    torchrun --standalone --nproc_per_node 2 benchmarks/tp.py --out benchmarks/results/tp-nvidia-h200.json
    torchrun --standalone --nproc_per_node 2 benchmarks/tp.py --shape tiny-llama --device cpu \\
        --lengths 256,512 --new-tokens 4 --repeats 1 --out /tmp/tp.json       # the CPU check (gloo)

The model is built from its configuration with RANDOM bf16 weights, as ``benchmarks/e2e.py`` does
(whose helpers this script imports): with one process (``WORLD_SIZE`` 1 or unset) the plain model
on one device, exactly e2e's; with N > 1 processes each rank builds only its shards, through
``from_pretrained(None, config=..., state_dict={}, tp_plan="auto")`` (every weight missing, so
transformers initialises each rank's slices at random on its own device: ``cuda:LOCAL_RANK``, NCCL;
the CPU, gloo, where no GPU is). TCA runs the uniform profile of e2e (every KV head the same
configuration, ``sigma`` 1, a nominal kept share of the candidates), every other setting
``TCAConfig.for_model``'s default.

Per (length, kept target, mode) a row with ``world_size``: ``ttft_ms`` (prompt in, first token
out), ``decode_ms_per_token`` (mean over the next ``--new-tokens`` tokens), each the median over
``--repeats`` timed generates after one warm-up generate of the same shape (Triton compiles and
autotunes on first call); a timed generate starts after a barrier with every device synchronised,
its times are wall-clock with the device synchronised after each step, and a rank's time is the
slowest rank's (``*_runs``: every repeat). ``ttft_stream_ms`` is the same first token timed when the
model's stream has computed it (what ``generate``'s caller waits for): the device-wide wait also
counts the tail of TCA's host-history copies, which run on a side stream and hold up no token; the
same for dense. ``peak_gib_per_rank`` (peak allocated GPU memory of each
rank during the generate; ``peak_gib`` the largest; 0 on the CPU), ``kv_bytes`` (the whole model's
device KV cache after the generate: transformers' own for dense, ``run.stats.kv_bytes`` for TCA)
and ``kv_bytes_per_rank``, ``kept_fraction`` / ``pairs_fraction`` (``run.stats``); TCA rows also
``graph_replays`` (decode steps replayed from a CUDA graph, over the timed generates) and
``graph_tokens_agree`` (16 greedy tokens of the default decode equal those of eager decode steps,
on every rank); every row also ``attention_ms`` (the prefill's attention alone, summed over
layers, the slowest rank's: SDPA for dense, selection + sparse attention for TCA, as e2e.py times
it) and ``amdahl_ttft_ms`` (dense's time to first token minus dense attention plus TCA's: what
TCA's first token would cost at this world size if nothing but its attention differed from dense).

Rank 0 writes the JSON after every length. An existing ``--out`` file of the same shape and device
keeps the rows of the other world sizes (this run's world size replaces its own), so the TP=1,
TP=2 (and TP=4) rows of one device end up side by side; the file's top-level provenance is the
last run's and ``runs`` holds each world size's. ``checks`` (printed too) sets, at each (length,
kept target) with TP=1 and TP=N rows: TCA's time to first token at TP=N over TP=1, dense over TCA
time to first token at TP=N (also on the model's stream, ``tca_over_dense_ttft_stream``, without a
target), dense over TCA decode per token at TP=N; the issue's targets, at 128K tokens and 10% kept
for TP=2: 1.6x, 2x, 1x (TCA no slower), on the device-synchronised times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import tca
from tca.core.config import TCAConfig
from tca.eval.provenance import command_line, device_name, provenance
from tca.integrations.transformers.cache import dense_cache_bytes


def _load_e2e():
    """``benchmarks/e2e.py`` (beside this file; the benchmarks are no package), imported by its path."""
    name = "tca_benchmarks_e2e"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("e2e.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


e2e = _load_e2e()  # its model shapes, configuration, timing and profile helpers

# 8 query / 4 KV heads: 1, 2 and 4 ranks each hold whole KV heads; a 2048-token context gives
# TCAConfig.for_model a 128-token window and 16-token blocks, so a few hundred tokens are sparse
TINY = dict(
    model_type="llama",
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
SHAPES = e2e.SHAPES | {"tiny-llama": TINY}
# the issue's checks: at 128K tokens and 10% kept, for TP=2 over TP=1 (name -> target, x)
ISSUE = dict(length=131072, kept=0.1, world_size=2)
TARGETS = {"tca_ttft_tp_speedup": 1.6, "tca_over_dense_ttft": 2.0, "tca_over_dense_decode": 1.0}


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by the tests for every committed result's command)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help=f"{', '.join(SHAPES)} or a config.json path")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--kept", default="0.1", help="kept share targets of the uniform profile")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after the first token")
    parser.add_argument("--repeats", type=int, default=3, help="timed generates per row (median)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default results/tp-<device>.json); other world sizes kept"
    )
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu (gloo under torchrun) to try the script on tiny-llama"
    )
    return parser


# ---- processes --------------------------------------------------------------------------------------------


def world_size() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def init_processes(device: str) -> None:
    """Join the process group of a torchrun with more than one process: NCCL on ``cuda:LOCAL_RANK``,
    gloo on the CPU. transformers' tensor parallelism then uses this group."""
    if world_size() == 1:
        return
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != accelerator:
        raise SystemExit(
            f"tp.py: --device {device} under torchrun, but transformers shards over {accelerator}: "
            f"pass --device {accelerator}"
        )
    if accelerator == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timedelta(minutes=5))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))


def barrier() -> None:
    """Every rank here, every device idle (nothing outside torchrun but the synchronisation)."""
    e2e.sync()
    if dist.is_initialized():
        dist.barrier()
    e2e.sync()


def gathered(value) -> list:
    """``value`` of every rank, in rank order (``[value]`` outside torchrun)."""
    if not dist.is_initialized():
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def build_model(config, device: str) -> torch.nn.Module:
    """Random bf16 weights, SDPA: e2e's plain model with one process; with more, each rank's shards
    (``tp_plan="auto"``), initialised at random where transformers places them."""
    if world_size() == 1:
        return e2e.random_model(config, device)
    from tca.bundled.models import _tensor_parallel  # the loader's own tp_plan="auto" arguments

    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report would list every weight as missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tp_plan's deprecation; DTensor random ops on a CPU mesh
            model = model_class.from_pretrained(
                None,
                config=config,
                state_dict={},
                dtype=torch.bfloat16,
                attn_implementation="sdpa",
                **_tensor_parallel(),
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()


# ---- measuring --------------------------------------------------------------------------------------------


def timed(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """One warm-up generate, then ``repeats`` timed ones (each after a barrier): medians over the
    repeats of the slowest rank's ttft and decode ms/token, every repeat's, and each rank's peak GiB."""
    e2e.timed_generate(model, ids, new_tokens)  # warm-up at this shape: compiles, autotunes, allocates
    ttft, ttft_stream, decode, peaks = [], [], [], []
    for _ in range(repeats):
        barrier()
        # per rank: (ttft, decode, median, peak, ttft on the model's stream)
        ranks = gathered(e2e.timed_generate(model, ids, new_tokens))
        ttft.append(max(r[0] for r in ranks))
        ttft_stream.append(max(r[4] for r in ranks))
        decode.append(max(r[1] for r in ranks))
        peaks.append([r[3] for r in ranks])
    per_rank = [max(p[i] for p in peaks) for i in range(len(peaks[0]))]
    return dict(
        ttft_ms=statistics.median(ttft),
        ttft_stream_ms=statistics.median(ttft_stream),
        decode_ms_per_token=statistics.median(decode),
        ttft_ms_runs=ttft,
        ttft_stream_ms_runs=ttft_stream,
        decode_ms_runs=decode,
        peak_gib=max(per_rank),
        peak_gib_per_rank=per_rank,
    )


def measure(model, shape: str, length: int, kept_targets, new_tokens: int, repeats: int) -> list[dict]:
    """Dense, then TCA at each kept target, on one random prompt (the same on every rank)."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)  # (1, L)
    ids = ids.to(model.device)  # cuda:LOCAL_RANK under tensor parallelism
    world = world_size()
    base = dict(
        shape=shape, world_size=world, L=length, batch=1, new_tokens=new_tokens, weights="random bf16"
    )
    dense_kv = dense_cache_bytes(model, length + new_tokens, 1)  # the whole model's, split evenly
    dense = timed(model, ids, new_tokens, repeats)
    dense_attention = max(gathered(e2e.dense_attention_ms(model, ids)))  # the slowest rank's
    rows = [
        base
        | dict(mode="dense", kept_target=None, kept_fraction=1.0, pairs_fraction=1.0)
        | dense
        | dict(kv_bytes=dense_kv, kv_bytes_per_rank=[dense_kv // world] * world)
        | dict(attention_ms=dense_attention, amdahl_ttft_ms=dense["ttft_ms"])
    ]
    for kept in kept_targets:
        profile = e2e.uniform_profile(model, kept, length)
        with tca.apply(model, profile) as run:
            times = timed(model, ids, new_tokens, repeats)
            stats = dict(
                kept_fraction=run.stats.kept_fraction,  # the whole model's (gathered over ranks)
                pairs_fraction=run.stats.pairs_fraction,
                kv_bytes=run.stats.kv_bytes,
                kv_bytes_per_rank=gathered(run.cache.kv_bytes),  # this rank's heads' cache
                host_kv_bytes=run.stats.host_kv_bytes,
            )
        stats |= dict(graph_replays=run.decode_graph.replays if run.decode_graph else 0)
        stats |= dict(graph_tokens_agree=graph_tokens_agree(model, ids, profile))
        attention = max(gathered(e2e.tca_attention_ms(model, profile, ids)))
        stats |= dict(attention_ms=attention, amdahl_ttft_ms=dense["ttft_ms"] - dense_attention + attention)
        rows.append(
            base | dict(mode="tca", kept_target=kept) | stats | times | dict(config=profile.config.to_dict())
        )
    return rows


def graph_tokens_agree(model, ids: torch.Tensor, profile, new_tokens: int = 16) -> bool:
    """Whether greedy tokens with ``tca.apply``'s default decode (CUDA graphs where they serve: each
    rank replays its own step, all-reduces included) equal those of eager decode steps, on every rank."""
    tokens = []
    for cuda_graphs in (None, False):
        with torch.no_grad(), tca.apply(model, profile, cuda_graphs=cuda_graphs):
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        tokens.append(out[0, -new_tokens:].tolist())
    return all(gathered(tokens[0] == tokens[1]))


# ---- the result file --------------------------------------------------------------------------------------


def previous_result(out: Path, shape: str, device: str) -> dict | None:
    """The result already at ``out`` (None: no file), checked to be a tp.py result of the same shape
    on the same device before anything is measured (SystemExit otherwise, on every rank)."""
    if not out.is_file():
        return None
    previous = json.loads(out.read_text())
    if "runs" not in previous or "rows" not in previous:
        raise SystemExit(f"tp.py: {out} is no tp.py result (it has no 'runs'): pass another --out")
    found = {"shape": previous.get("shape"), "device": _device_kind(previous.get("device", ""))}
    wanted = {"shape": shape, "device": _device_kind(device)}
    if found != wanted:
        raise SystemExit(f"tp.py: {out} holds {found}, this run is {wanted}: pass another --out")
    return previous


def _device_kind(device: str) -> str:
    """The GPU's name, or ``CPU`` (whose recorded name carries a thread count that varies per run)."""
    return device.split(" (")[0]


def merge(previous: dict | None, record: dict) -> dict:
    """``record`` (one run: one world size) with the rows and provenance of the other world sizes
    kept from ``previous`` (the file already at ``--out``); this world size's rows are replaced."""
    world = record["world_size"]
    if previous is None:
        return record | {"runs": {str(world): run_provenance(record)}}
    kept = [row for row in previous["rows"] if row["world_size"] != world]
    rows = sorted(kept + record["rows"], key=lambda r: (r["world_size"], r["L"], r["kept_target"] or 0))
    runs = {key: run for key, run in previous["runs"].items() if key != str(world)}
    runs[str(world)] = run_provenance(record)
    return record | {"rows": rows, "runs": dict(sorted(runs.items(), key=lambda kv: int(kv[0])))}


def run_provenance(record: dict) -> dict:
    """The provenance fields of one run's record (what ``runs`` keeps per world size)."""
    skip = ("rows", "runs", "checks", "model_config", "note")
    return {key: value for key, value in record.items() if key not in skip}


def checks(rows: list[dict]) -> list[dict]:
    """The issue's ratios at every (length, kept target) that has TP=1 and TP=N rows, N > 1: TCA's
    time to first token TP=1 / TP=N, dense / TCA time to first token and decode per token at TP=N.
    ``target`` (x) where the issue sets one (128K, 10% kept, TP=2), ``met`` then whether it holds."""
    table = {(r["world_size"], r["L"], r["mode"], r["kept_target"]): r for r in rows}
    out = []
    for (world, length, mode, kept), tca_n in table.items():
        dense_n = table.get((world, length, "dense", None))
        if mode != "tca" or world == 1 or dense_n is None:
            continue
        ratios = {
            "tca_over_dense_ttft": dense_n["ttft_ms"] / tca_n["ttft_ms"],
            "tca_over_dense_decode": dense_n["decode_ms_per_token"] / tca_n["decode_ms_per_token"],
        }
        if "ttft_stream_ms" in dense_n and "ttft_stream_ms" in tca_n:  # rows measured since it was
            ratios["tca_over_dense_ttft_stream"] = dense_n["ttft_stream_ms"] / tca_n["ttft_stream_ms"]
        tca_1 = table.get((1, length, "tca", kept))
        if tca_1 is not None:
            ratios["tca_ttft_tp_speedup"] = tca_1["ttft_ms"] / tca_n["ttft_ms"]
        issue = (length, kept, world) == (ISSUE["length"], ISSUE["kept"], ISSUE["world_size"])
        for name, value in ratios.items():
            target = TARGETS.get(name) if issue else None
            met = None if target is None else value >= target
            out.append(
                dict(
                    name=name,
                    world_size=world,
                    L=length,
                    kept_target=kept,
                    value=value,
                    target=target,
                    met=met,
                )
            )
    return out


def summary(record: dict) -> list[str]:
    """One line per row, then one per check."""
    lines = ["TP L mode kept | ttft_ms (amdahl) decode_ms/token peak_GiB/rank kv_GiB kept_fraction"]
    for r in record["rows"]:
        peak = max(r["peak_gib_per_rank"])
        lines.append(
            f"TP{r['world_size']} {r['L']} {r['mode']} {r['kept_target']} | {r['ttft_ms']:.0f} "
            f"({r.get('amdahl_ttft_ms', float('nan')):.0f}) "
            f"{r['decode_ms_per_token']:.1f} {peak:.1f} {r['kv_bytes'] / 2**30:.3f} {r['kept_fraction']:.3f}"
        )
    for c in record["checks"]:
        verdict = (
            ""
            if c["target"] is None
            else f" (target >= {c['target']:g}x: {'met' if c['met'] else 'NOT met'})"
        )
        lines.append(
            f"check TP{c['world_size']} {c['L']} kept {c['kept_target']} "
            f"{c['name']}: {c['value']:.2f}x{verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    init_processes(args.device)
    world = world_size()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    kept = [float(x) for x in args.kept.split(",") if x]
    config = e2e.model_config(args.shape, max(lengths) + args.new_tokens + 256, SHAPES)
    name = args.shape if args.shape in SHAPES else Path(args.shape).stem
    device = device_name(args.device)
    out = Path(args.out) if args.out else e2e.default_out("tp", device)
    # on every rank, before any work: a wrong --out file stops them all
    previous = previous_result(out, name, device)
    resolved = vars(args) | {
        "world_size": world,
        "tensor_parallel": "tp_plan=auto" if world > 1 else None,
        "tca": TCAConfig.for_model(config).to_dict(),
        "profile": "uniform, sigma 1",
    }
    record = provenance(args.device, resolved) | dict(
        world_size=world, shape=name, model_config=config.to_dict(), rows=[]
    )
    if world > 1:  # the command as one types it again: torchrun started this process
        launcher = f"torchrun --standalone --nproc_per_node {world} "
        record["command"] = command_line().replace("python ", launcher, 1)
    record["note"] = (
        "random bf16 weights: speed does not depend on the weight values once the kept sets are fixed"
    )
    torch.manual_seed(0)  # the same random replicated weights on every rank
    model = build_model(config, args.device)
    for length in lengths:
        rows = measure(model, name, length, kept, args.new_tokens, args.repeats)
        if rank() == 0:
            record["rows"] += rows
            merged = merge(previous, record)
            merged["checks"] = checks(merged["rows"])
            out.parent.mkdir(parents=True, exist_ok=True)
            # after every length: an interrupted run keeps its rows
            out.write_text(json.dumps(merged, indent=1))
            print("\n".join(summary({"rows": rows, "checks": []})[1:]), flush=True)
    if rank() == 0:
        print("\n".join(summary(merged)))
        print(f"wrote {out}")
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
