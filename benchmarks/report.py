"""The README's result tables, written from the committed results under benchmarks/results/.

    python benchmarks/report.py            # rewrite every table in README.md
    python benchmarks/report.py --check    # exit 1, with a diff, if README.md's tables differ
    python benchmarks/report.py --print    # print them

Each table sits in README.md between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``;
everything between the two markers is replaced by ``TABLES[NAME]()``, which reads only files
under benchmarks/results/ (never ``archive/``). The prose around the tables is the README's own.
``tests/test_report.py`` runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
BLOCK = re.compile(
    r"(<!-- report:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.DOTALL
)
METHODS = {  # baselines, in the order the tables list them
    "flexprefill": "FlexPrefill-style",
    "snapkv": "SnapKV-style",
    "streaming": "StreamingLLM (sinks + window)",
    "xattention": "XAttention-style",
    "vertical_slash": "vertical-slash (MInference-style)",
    "topk_last": "exact top-k by the last query",
    "random": "random drop",
}
OPTION_NAMES = {
    "retrieval_threshold": "retrieval threshold",
    "local_window": "window",
    "block_size": "block",
    "observation_max": "observation max",
}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def markdown(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align or ["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def short_length(tokens: int) -> str:
    """8K, 128K, 1M."""
    return f"{tokens >> 20}M" if tokens >= 1 << 20 and tokens % (1 << 20) == 0 else f"{tokens // 1024}K"


# ---------------------------------------------------------------------------------------- speed


ATTENTION_ROWS = [  # (phase, L, target kept fraction): the rows the README shows
    ("prefill", 32768, 0.1),
    ("prefill", 65536, 0.1),
    *(("prefill", 131072, f) for f in (0.05, 0.1, 0.2, 0.4)),
    ("decode", 65536, 0.1),
    ("decode", 131072, 0.1),
    ("decode", 131072, 0.4),
]


def milliseconds(value: float) -> str:
    """Three significant digits, at most three decimals, whole from 1000: 18731, 239, 19.0, 7.28, 0.096."""
    if value >= 1000:
        return f"{value:.0f}"
    text = f"{value:#.3g}".rstrip(".")
    return f"{value:.3f}" if len(text.partition(".")[2]) > 3 else text


# past 128K, one process running every length one after another (H200)
LONG_ATTENTION_ROWS = [
    (phase, length, f)
    for length in (524288, 1048576)
    for phase in ("prefill", "decode")
    for f in (0.02, 0.05, 0.1)
]


def attention_table(
    name: str = "attention-h100-80gb-hbm3.json", shape: str = "llama-3.1-8b", keys: list = ATTENTION_ROWS
) -> str:
    rows = {(r["phase"], r["L"], r["target_fraction"]): r for r in load(name)["rows"] if r["shape"] == shape}
    header = ["phase", "L", "kept", "pairs", "dense ms", "TCA ms", "selection ms", "efficiency", "speed-up"]
    cells = []
    for key in keys:
        r = rows[key]
        selection = milliseconds(r["selection_ms"]) if r["phase"] == "prefill" else "-"
        cells.append(
            [r["phase"], short_length(r["L"]), f"{r['target_fraction']:.0%}", f"{r['pairs_fraction']:.2f}"]
            + [milliseconds(r["dense_ms"]), milliseconds(r["tca_ms"]), selection]
            + [f"{r['efficiency']:.2f}", f"{r['speedup']:.2f}x"]
        )
    return markdown(header, cells)


def e2e_table(name: str = "e2e-nvidia-h200.json") -> str:
    """What a user runs: generate() inside tca.apply with the defaults against dense, per length and
    kept target, from one run (every ratio is to the dense row of the same process)."""
    rows = [r for r in load(name)["rows"] if r["mode"] in ("dense", "tca")]  # the defaults
    dense = {(r["L"], r["batch"]): r for r in rows if r["mode"] == "dense"}
    header = ["L", "batch", "kept", "ttft ms", "x dense", "vs Amdahl", "decode ms/token", "x dense"]
    header += ["peak GiB", "KV GiB"]
    cells = []
    for r in sorted(rows, key=lambda r: (r["batch"], r["L"], r["kept_target"] or 0)):
        base, kept = dense[r["L"], r["batch"]], r["kept_target"]
        ttft = base["ttft_ms"] / r["ttft_ms"]
        decode = base["decode_ms_per_token"] / r["decode_ms_per_token"]
        cells.append(
            [short_length(r["L"]), str(r["batch"]), "dense" if kept is None else f"{kept:.0%}"]
            + [f"{r['ttft_ms']:.0f}", "" if kept is None else f"{ttft:.2f}x"]
            + ["" if kept is None else f"{r['ttft_ms'] / r['amdahl_ttft_ms']:.2f}"]
            + [f"{r['decode_ms_per_token']:.1f}", "" if kept is None else f"{decode:.2f}x"]
            + [f"{r['peak_gib']:.1f}", f"{r['kv_bytes'] / 2**30:.2f}"]
        )
    return markdown(header, cells)


def e2e_modes_table(name: str = "e2e-nvidia-h200.json", history_kept: float = 0.1) -> str:
    """Decode per token in every mode at batch 1 (dense eager and compiled, TCA with its defaults,
    which replay a CUDA graph, and TCA eager), then what the host history costs (TCA without it) at
    the kept target ``history_kept``, every batch."""
    rows = load(name)["rows"]
    by = {(r["L"], r["batch"], r["mode"], r["kept_target"]): r for r in rows}
    header = ["L", "kept", "dense", "dense compiled", "TCA (defaults: graph)", "TCA eager"]
    header += ["x dense", "x dense compiled", "x dense (eager vs eager)"]
    cells = []
    for r in sorted(rows, key=lambda r: (r["L"], r["kept_target"] or 0)):
        if r["mode"] != "tca" or r["batch"] != 1:
            continue
        dense, compiled = by[r["L"], 1, "dense", None], by[r["L"], 1, "dense-graph", None]
        eager = by[r["L"], 1, "tca-eager", r["kept_target"]]
        ms = [x["decode_ms_per_token"] for x in (dense, compiled, r, eager)]
        cells.append(
            [short_length(r["L"]), f"{r['kept_target']:.0%}"]
            + [f"{m:.1f}" for m in ms]
            + [f"{ms[0] / ms[2]:.1f}x", f"{ms[1] / ms[2]:.1f}x", f"{ms[0] / ms[3]:.2f}x"]
        )
    table = markdown(header, cells)
    header = ["L", "kept", "ttft, history kept (default)", "ttft, keep_history=False", "history's cost"]
    header += ["next turn ttft: dense", "TCA", "TCA without history"]
    cells = []
    for r in rows:
        if r["mode"] != "tca" or r["kept_target"] != history_kept:
            continue
        off = by[r["L"], r["batch"], "tca-no-history", history_kept]
        dense = by[r["L"], r["batch"], "dense", None]
        label = short_length(r["L"]) + ("" if r["batch"] == 1 else f" x{r['batch']}")
        cells.append(
            [label, f"{history_kept:.0%}", f"{r['ttft_ms']:.0f}", f"{off['ttft_ms']:.0f}"]
            + [f"{r['ttft_ms'] / off['ttft_ms'] - 1:+.1%}"]
            + [f"{x['next_turn_ttft_ms']:.0f}" for x in (dense, r, off)]
        )
    return table + "\n\n" + markdown(header, cells)


def tp_table(name: str = "tp-nvidia-h200.json") -> str:
    """Tensor parallel (``benchmarks/tp.py``): each world size's rows, then the checks at TP > 1."""
    data = load(name)
    header = ["GPUs", "L", "mode", "ttft ms", "decode ms/token", "peak GiB per GPU", "KV GiB (all GPUs)"]
    cells = [
        [str(r["world_size"]), short_length(r["L"])]
        + ["dense" if r["mode"] == "dense" else f"TCA {r['kept_target']:.0%}", f"{r['ttft_ms']:.0f}"]
        + [f"{r['decode_ms_per_token']:.1f}", f"{max(r['peak_gib_per_rank']):.1f}"]
        + [f"{r['kv_bytes'] / 2**30:.2f}"]
        for r in sorted(data["rows"], key=lambda r: (r["L"], r["world_size"], r["mode"]))
    ]
    names = {
        "tca_ttft_tp_speedup": "TCA's first token, TP=1 / TP=N",
        "tca_over_dense_ttft": "first token, dense / TCA",
        "tca_over_dense_decode": "decode per token, dense / TCA",
    }
    checks = [
        [str(c["world_size"]), short_length(c["L"]), names[c["name"]], f"{c['value']:.2f}x"]
        + ["" if c["target"] is None else f">= {c['target']:g}x: {'met' if c['met'] else 'not met'}"]
        for c in data["checks"]
    ]
    return markdown(header, cells) + "\n\n" + markdown(["GPUs", "L", "ratio", "value", "target"], checks)


# ------------------------------------------------------------------------------ fidelity, needles


def fidelity_table(name: str = "prefill-quality-cpu.json") -> str:
    header = ["window", "block", "tau", "L", "last-position KL", "ppl ratio (2nd half)", "by quarter"]
    rows = []
    for r in load(name)["rows"]:
        quarters = " / ".join(f"{q:.3f}" for q in r["ppl_ratio_by_quarter"])
        rows.append(
            [str(r["local_window"]), str(r["block_size"]), f"{r['tau']:g}", str(r["length"])]
            + [f"{r['kl_last_mean']:.4f}", f"{r['ppl_ratio_second_half']:.3f}", quarters]
            + [f"{r['kept_fraction']:.2f}", f"{r['pairs_fraction']:.2f}"]
        )
    return markdown([*header, "kept", "pairs"], rows)


NEEDLE_TASKS = {"single": "single", "multi": "three, asked for one", "two_turn": "two-turn chat"}


def needle_table(name: str = "needle-h200-retrieval.json") -> str:
    header = ["task", "L", "dense right", "TCA right", "TCA misses where dense is right"]
    rows = []
    for key, part in load(name)["summary"].items():
        task, length = key.split("@")
        n = part["samples"]
        rows.append(
            [NEEDLE_TASKS[task], short_length(int(length)), f"{part['dense_correct']}/{n}"]
            + [f"{part['tca_correct']}/{n}", str(part["tca_misses_where_dense_right"])]
            + [f"{part['kv_ratio_max']:.2f}"]
        )
    return markdown([*header, "KV bytes (TCA / dense, max)"], rows)


# ------------------------------------------------------------------------------------ task suite

GRID, CONFIRMATION, POOLED = "eval-2026-11-25.json", "eval-2026-11-26.json", "eval-pooled-2026-11-26.json"
RUNS = (("all methods", GRID), ("TCA vs full", CONFIRMATION), ("both pooled", POOLED))
DEFAULT_TCA = {GRID: "tca@tau0.9", CONFIRMATION: "tca@tau0.9,retrieval_threshold=0.03", POOLED: "tca@tau0.9"}


def setting_label(key: str) -> str:
    """``snapkv@0.5`` -> "SnapKV-style, 50%"; ``tca@tau0.9,retrieval_threshold=0.03`` -> "TCA, tau
    0.9, retrieval threshold 0.03 (default)": an option spelled out at the current default says so."""
    from tca.core.config import TCAConfig

    if key == "full":
        return "full attention"
    method, _, value = key.partition("@")
    if method != "tca":
        return f"{METHODS[method]}, {float(value):.0%}"
    tau, *options = value.removeprefix("tau").split(",")
    label = f"TCA, tau {tau}"
    for option in options:
        field, _, text = option.partition("=")
        label += f", {OPTION_NAMES.get(field, field)} {text}"
        if getattr(TCAConfig(), field) == (None if text == "off" else float(text)):
            label += " (default)"
    return label


def gap_text(gap: dict) -> str:
    low, high = gap["ci95"]
    return f"{gap['gap']:+.1f} ({low:.1f}, {high:.1f})"


def averages(data: dict) -> dict[tuple[str, int], dict]:
    return {(r["setting"], r["length"]): r for r in data["rows"] if r["task"] == "average"}


def gaps(data: dict) -> dict[tuple[str, int], dict]:
    return {(g["setting"], g["length"]): g for g in data["gaps_to_full"]}


def seed_ranges(data: dict) -> str:
    """The seeds of a run's answers, from the provenance records beside its inputs: "100-119"."""
    seeds = set()
    for answers in data["inputs"]:
        runs = Path(__file__).parents[1] / f"{answers}.runs.jsonl"
        for line in runs.read_text().splitlines():
            spec = json.loads(line)["config"]["eval"]
            seeds |= set(range(spec["seed"], spec["seed"] + spec["samples"]))
    return ranges(seeds)


def ranges(numbers: set[int]) -> str:
    """{1, 2, 3, 7, 8} -> "1-3, 7-8"."""
    ordered, out = sorted(numbers), []
    start = ordered[0]
    for number, following in zip(ordered, [*ordered[1:], None], strict=True):
        if following != number + 1:
            out.append(f"{start}-{number}")
            start = following
    return ", ".join(out)


def eval_runs_table() -> str:
    what = {
        GRID: "every method at 10/30/50% kept, TCA at tau 0.3-0.9, perplexity",
        CONFIRMATION: "full attention, TCA (defaults), FlexPrefill-style at 50%",
        POOLED: "TCA (defaults) against full attention, both runs together",
    }
    rows = []
    for run, name in RUNS:
        data = load(name)
        prompts = max(g["prompts"] for g in data["gaps_to_full"] if g["setting"] == DEFAULT_TCA[name])
        rows.append([run, f"{prompts:,}", seed_ranges(data), what[name], f"`{name}`"])
    return markdown(
        ["run", "prompts per length", "seeds", "what", "file"], rows, ["---", "---:", "---", "---", "---"]
    )


def tca_gaps_table() -> str:
    rows = []
    for run, name in RUNS:
        data, setting = load(name), DEFAULT_TCA[name]
        by_length = gaps(data)
        kv = {k: r["kv_fraction"] for k, r in averages(data).items()} if "rows" in data else {}
        prompts = max(g["prompts"] for g in data["gaps_to_full"] if g["setting"] == setting)
        cells = [f"{run} ({prompts:,} prompts)"]
        for length in (2048, 4096, 8192):
            gap = by_length[setting, length]
            cells += [gap_text(gap), f"{kv.get((setting, length), gap.get('kv_fraction')):.2f}"]
        rows.append(cells)
    header = ["run", "2K gap", "KV", "4K gap", "KV", "8K gap", "KV"]
    return markdown(header, rows, ["---", "---", "---:", "---", "---:", "---", "---:"])


def scores_table(
    name: str, settings: list[str], lengths: tuple[int, ...] = (2048, 4096, 8192), kv: str = "kv_fraction"
) -> str:
    """Per setting and length: suite score, KV fraction (``kv``: of every layer, or
    ``managed_kv_fraction``: of the layers TCA manages) and gap to full attention with its interval."""
    data = load(name)
    score, gap = averages(data), gaps(data)
    rows = []
    for setting in settings:
        cells = [setting_label(setting)]
        for length in lengths:
            row = score[setting, length]
            cells += [f"{row['score']:.1f}", f"{row[kv]:.2f}"]
            cells.append("" if setting == "full" else gap_text(gap[setting, length]))
        rows.append(cells)
    header = ["setting"]
    for length in lengths:
        header += [f"{short_length(length)} score", "KV" if kv == "kv_fraction" else "managed KV", "gap"]
    return markdown(header, rows, ["---"] + ["---:", "---:", "---"] * len(lengths))


def confirmation_table() -> str:
    settings = sorted({r["setting"] for r in load(CONFIRMATION)["rows"]}, key=_setting_order)
    return scores_table(CONFIRMATION, settings)


def grid_table() -> str:
    """Every setting of the all-methods run but the calibration-text variants (``/docs``, ``/code``)."""
    settings = {r["setting"] for r in load(GRID)["rows"] if "/" not in r["setting"]}
    return scores_table(GRID, sorted(settings, key=_setting_order))


GEMMA_OPTIONS = "continuation=0.9,local_window=1024,observation_max=1,retrieval_threshold=off"
GEMMA_SETTINGS = [
    "full",
    f"tca@tau0.805,{GEMMA_OPTIONS}",
    f"tca@tau0.82,{GEMMA_OPTIONS}",
    f"tca@tau0.8,{GEMMA_OPTIONS}",
    "tca@tau0.85,local_window=1024,retrieval_threshold=off",
    "snapkv@0.4",
    "vertical_slash@0.4",
    "streaming@0.4",
]


def gemma3_table(name: str = "eval-gemma3-270m-h200.json") -> str:
    """Gemma 3 270M's task suite at 16K and 32K: full attention, TCA with and without the two
    importance options, the baselines at TCA's managed KV."""
    return scores_table(name, GEMMA_SETTINGS, (16384, 32768), "managed_kv_fraction")


def _setting_order(key: str) -> tuple:
    """full, TCA by tau (highest first), then baselines by kept fraction (highest first) and method."""
    method, _, value = key.partition("@")
    if method == "full":
        return (0,)
    if method == "tca":
        return (1, -float(value.removeprefix("tau").split(",")[0]), key)
    return (2, -float(value), list(METHODS).index(method))


TABLES: dict[str, Callable[[], str]] = {
    "attention": attention_table,
    "attention-long": lambda: attention_table("attention-nvidia-h200.json", keys=LONG_ATTENTION_ROWS),
    "e2e": e2e_table,
    "e2e-modes": e2e_modes_table,
    "tp": tp_table,
    "gemma3-eval": gemma3_table,
    "fidelity": fidelity_table,
    "needles": needle_table,
    "eval-runs": eval_runs_table,
    "tca-gaps": tca_gaps_table,
    "confirmation": confirmation_table,
    "grid": grid_table,
}


# ---------------------------------------------------------------------------------------- README


def render(text: str) -> str:
    """``text`` with every report block's body rewritten; an unknown block name is an error."""
    unknown = sorted({m["name"] for m in BLOCK.finditer(text)} - set(TABLES))
    if unknown:
        raise SystemExit(f"README.md names report tables that report.py does not write: {unknown}")
    return BLOCK.sub(lambda m: f"{m.group(1)}{TABLES[m['name']]()}\n{m.group(4)}", text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's tables differ")
    mode.add_argument("--print", action="store_true", help="print every table")
    parser.add_argument("--readme", type=Path, default=README)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print:
        for name, table in TABLES.items():
            print(f"<!-- report:{name} -->\n{table()}\n")
        return 0
    text = args.readme.read_text()
    missing = [name for name in TABLES if f"<!-- report:{name} -->" not in text]
    if missing:
        print(f"{args.readme}: no report block for {missing}", file=sys.stderr)
        return 1
    written = render(text)
    if not args.check:
        args.readme.write_text(written)
        return 0
    if written != text:
        diff = difflib.unified_diff(
            text.splitlines(), written.splitlines(), "README.md", "report.py", lineterm=""
        )
        print("\n".join(diff), file=sys.stderr)
        print("README.md's tables differ from the results: run python benchmarks/report.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
