"""The ``tca`` command: a thin layer over the library.

    tca generate                     answer a question about a long document with TCA
    tca calibrate --out P.json       calibrate a model -> a profile
    tca profile show P.json          keep ratios per layer and KV head (table, PNG heatmap)
    tca eval --out R.jsonl           every method on a long-context task suite (resumable)

Errors a user can cause are printed as one line, ``tca: error: ...``, with exit status 2.
Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__

DTYPES = ("float32", "bfloat16", "float16")
MIB = 1024 * 1024


class UserError(Exception):
    """A mistake in the command line or its inputs, reported as one line."""


# ---------------------------------------------------------------- shared helpers


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu.")
    return device


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..bundled.models import load_model

    device = _check_device(args.device)
    return load_model(args.model, dtype=_torch_dtype(args.dtype), device=device)


def _read_text(path: str, what: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {path}: no such file.")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text.") from None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' or 'gemma3-270m' (bundled) or a local HF checkpoint directory",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype")


# ---------------------------------------------------------------- tca generate


def _load_profile(args: argparse.Namespace) -> tuple[Any, str]:
    """The profile to use and a description of where it came from."""
    from ..bundled.profiles import bundled_profiles, profile_for
    from ..core.profile import Profile

    if args.profile:
        return Profile.load(args.profile), args.profile
    if args.model in bundled_profiles():
        return profile_for(args.model), f"bundled ({args.model})"
    raise UserError(
        f"no bundled profile for model {args.model!r}: make one with "
        f"`tca calibrate --model {args.model} --out PROFILE.json` and pass --profile PROFILE.json, "
        "or use --dense."
    )


def _document(args: argparse.Namespace) -> Any:
    from ..bundled.demo import Document, demo_document

    if args.file is None:
        document = demo_document()
        return Document(document.text, args.question or document.question, document.answer, document.source)
    question = args.question or "What is this document about? Answer in one sentence."
    return Document(_read_text(args.file, "--file"), question, None, args.file)


def _prompt_ids(tokenizer: Any, document: Any) -> Any:
    """(1, L) prompt ids: the chat template when the tokenizer has one, else a plain prompt."""
    content = f"{document.text.strip()}\n\nAnswer the question about the text above.\n{document.question}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(f"{content}\nAnswer:", return_tensors="pt")["input_ids"]


def _progress_streamer(total: int) -> Any:
    """A generate() streamer that shows a tqdm bar over new tokens (the first one waits for prefill)."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenProgress(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="prefill + decode", unit="tok", leave=False)
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            self.bar.update(1)

        def end(self) -> None:
            self.bar.close()

    return TokenProgress()


def _dense_kv_bytes(model: Any, tokens: int) -> int:
    """Bytes a dense KV cache holds for ``tokens`` tokens (keys and values, all layers)."""
    from ..integrations.transformers.cache import dense_cache_bytes

    return dense_cache_bytes(model, tokens)


def _generate(model: Any, tokenizer: Any, ids: Any, args: argparse.Namespace, profile: Any) -> tuple:
    """Greedy generation, dense or under TCA. Returns (new token ids, stats or None, seconds)."""
    import contextlib

    import torch

    from ..integrations.transformers import apply

    ids = ids.to(model.device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        "streamer": _progress_streamer(args.max_new_tokens),
    }
    # one turn: no host copy of the full history is needed, so the memory saving is real
    scope = contextlib.nullcontext() if profile is None else apply(model, profile, keep_history=False)
    start = time.perf_counter()
    with torch.no_grad(), scope as run:
        output = model.generate(ids, **kwargs)
    seconds = time.perf_counter() - start
    return output[0, ids.shape[-1] :], (None if run is None else run.stats), seconds


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    started = time.perf_counter()
    document = _document(args)
    profile, profile_source = (None, "") if args.dense else _load_profile(args)
    model, tokenizer = _load(args)
    if profile is not None:
        profile.check_fits(model)
    loaded = time.perf_counter() - started
    ids = _prompt_ids(tokenizer, document)
    new_ids, stats, seconds = _generate(model, tokenizer, ids, args, profile)
    answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    cached_tokens = ids.shape[-1] + len(new_ids) - 1  # the last token is never written to the cache

    print(f"document: {document.source}, {ids.shape[-1]:,} prompt tokens")
    print(f"question: {document.question}")
    print(f"answer: {answer}")
    if document.answer is not None:
        print(f"expected: {document.answer} ({'found' if document.answer in answer else 'NOT found'})")
    if stats is None:
        dense = _dense_kv_bytes(model, cached_tokens)
        print("attention: dense (full KV cache)")
        print(f"kv cache: {dense / MIB:.2f} MiB dense")
    else:
        config = profile.config
        print(
            f"attention: TCA (profile {profile_source}, tau {config.tau}, "
            f"window {config.local_window}, block {config.block_size})"
        )
        print(f"kept fraction: {stats.kept_fraction:.3f} of KV entries after prefill")
        saved = 1 - stats.kv_bytes / max(stats.dense_kv_bytes, 1)
        print(
            f"kv cache: {stats.kv_bytes / MIB:.2f} MiB instead of {stats.dense_kv_bytes / MIB:.2f} MiB dense "
            f"({100 * saved:.1f}% saved)"
        )
    rate = len(new_ids) / seconds if seconds > 0 else float("inf")
    print(
        f"time: {seconds:.2f} s to generate {len(new_ids)} tokens ({rate:.1f} tok/s); loading {loaded:.2f} s"
    )
    return 0


# ---------------------------------------------------------------- tca calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..core.config import TCAConfig
    from ..integrations.transformers import calibrate

    text = None if args.text is None else _read_text(args.text, "--text")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {out.parent} does not exist.")
    model, tokenizer = _load(args)
    changes = {"tau": args.tau, "local_window": args.window, "block_size": args.block, "alpha": args.alpha}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.retrieval_threshold is not None:
        off = args.retrieval_threshold == "off"
        changes["retrieval_threshold"] = None if off else float(args.retrieval_threshold)
    config = TCAConfig.for_model(model).replace(**changes)
    start = time.perf_counter()
    profile = calibrate(model, tokenizer, text=text, config=config, max_tokens=args.max_tokens)
    seconds = time.perf_counter() - start
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank holds the same profile: one writes
        profile.save(out)
    shape = profile.mu.shape
    ratio = profile.keep_ratios(profile.calibration_tokens)
    print(
        f"wrote {out}: {shape[0]} managed layers x {shape[1]} KV heads, tau {config.tau}, "
        f"window {config.local_window}, block {config.block_size}, "
        f"{profile.calibration_tokens:,} calibration tokens, {seconds:.1f} s"
    )
    print(
        f"mean keep ratio at {profile.calibration_tokens:,} tokens: {ratio.mean():.3f}; "
        f"dense heads: {int((profile.mu == float('inf')).sum())}" + _retrieval_note(profile)
    )
    return 0


# ---------------------------------------------------------------- tca profile show


def _retrieval_note(profile: Any) -> str:
    if profile.retrieval is None or profile.config.retrieval_threshold is None:
        return ""
    count = int((profile.retrieval >= profile.config.retrieval_threshold).sum())
    return f" ({count} retrieval heads, score >= {profile.config.retrieval_threshold})"


def profile_table(profile: Any, length: int) -> str:
    """Per layer: each KV head's keep ratio at ``length`` tokens, min / median / max, dense heads."""
    import numpy as np

    ratios = profile.keep_ratios(length)  # (n_layers, n_kv_heads)
    dense = np.isinf(profile.mu)
    n_kv = ratios.shape[1]
    fingerprint, config = profile.fingerprint, profile.config
    lines = [
        f"{fingerprint['architecture']}: {fingerprint['n_layers']} layers, "
        f"{fingerprint['n_heads']} query heads, "
        f"{n_kv} KV heads; tau {config.tau}, window {config.local_window}, block {config.block_size}; "
        f"calibrated on {profile.calibration_tokens:,} tokens",
        *_managed_note(profile),
        f"keep ratio (KV entries kept / context, window included) at {length:,} tokens:",
        "layer " + " ".join(f"{'kv' + str(g):>6}" for g in range(n_kv)) + "    min median    max  dense",
    ]
    for layer, row, dense_heads in zip(profile.managed_layers, ratios, dense, strict=True):
        heads = " ".join(f"{r:6.3f}" for r in row)
        spread = f"{row.min():6.3f} {np.median(row):6.3f} {row.max():6.3f}"
        lines.append(f"{layer:5d} {heads} {spread} {int(dense_heads.sum()):6d}")
    lines.append(
        f"all   mean {ratios.mean():.3f}, min {ratios.min():.3f}, median {np.median(ratios):.3f}, "
        f"max {ratios.max():.3f}; dense heads {int(dense.sum())} of {dense.size}" + _retrieval_note(profile)
    )
    return "\n".join(lines)


def _managed_note(profile: Any) -> list[str]:
    """A line naming the layers TCA manages, when it leaves some (sliding-window) layers alone."""
    n_layers, managed = profile.fingerprint["n_layers"], profile.managed_layers
    if len(managed) == n_layers:
        return []
    return [
        f"TCA manages the {len(managed)} full-attention layers {', '.join(map(str, managed))}; the other "
        f"{n_layers - len(managed)} keep their own sliding-window attention and cache (not shown)"
    ]


def profile_heatmap(profile: Any, length: int, out: Path) -> None:
    """Write a PNG heatmap of keep ratios, layers (rows) by KV heads (columns)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UserError(
            "--png needs matplotlib, which is not installed: `pip install matplotlib` "
            "(or `pip install -e '.[dev]'`)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratios = profile.keep_ratios(length)
    n_layers, n_kv = ratios.shape
    figure, axes = plt.subplots(figsize=(2.0 + 0.9 * n_kv, 1.5 + 0.22 * n_layers))
    image = axes.imshow(ratios, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    if n_kv * n_layers <= 400:
        for (layer, head), value in np.ndenumerate(ratios):
            colour = "black" if value > 0.6 else "white"
            axes.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
    axes.set_xticks(range(n_kv))
    axes.set_yticks(range(n_layers), [str(layer) for layer in profile.managed_layers])
    axes.set_xlabel("KV head")
    axes.set_ylabel("layer")
    axes.set_title(f"TCA keep ratio at {length:,} tokens (tau {profile.config.tau})", fontsize=9)
    figure.colorbar(image, ax=axes, label="keep ratio")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def cmd_profile_show(args: argparse.Namespace) -> int:
    from ..core.profile import Profile

    profile = Profile.load(args.path)
    length = args.length or profile.calibration_tokens
    if length < 1:
        raise UserError(f"--length must be >= 1, got {length}.")
    if args.png and not Path(args.png).parent.is_dir():
        raise UserError(f"--png {args.png}: the folder {Path(args.png).parent} does not exist.")
    print(profile_table(profile, length))
    if args.png:
        profile_heatmap(profile, length, Path(args.png))
        print(f"wrote {args.png}")
    return 0


# ---------------------------------------------------------------- tca eval


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from ..eval.plots import write_all
    from ..eval.runner import Evaluator
    from ..eval.spec import EvalSpec

    spec = EvalSpec(
        methods=args.methods,
        tasks=args.tasks,
        lengths=args.lengths,
        samples=args.samples,
        kept_fractions=args.kept_fractions,
        taus=args.taus,
        seed=args.seed,
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        only=args.settings,
        calibration=args.calibration,
    )
    spec.check()
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {out.parent} does not exist.")
    model, tokenizer = _load(args)
    from ..eval.provenance import provenance

    with out.with_name(out.name + ".runs.jsonl").open("a") as log:  # who ran what, where: one line per run
        log.write(json.dumps(provenance(args.device) | {"model": args.model, "dtype": args.dtype}) + "\n")
    for row in Evaluator(model, tokenizer, spec).run(out):
        shown = {k: row[k] for k in ("setting", "task", "length", "seed", "score", "kv_fraction")}
        print(json.dumps(shown), flush=True)
    if args.plots:
        for path in write_all(out, Path(args.plots)):
            print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tca",
        description="TCA-Attention: sparse attention and a smaller KV cache for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"tca-attention {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser(
        "generate",
        help="answer a question about a long document with TCA",
        description="Answer a question about a long document with TCA (or --dense) and report the kept "
        "fraction, the KV memory saved and the time. With no arguments: the bundled SmolLM2, its "
        "bundled profile, and the opening of The War of the Worlds with a planted passcode.",
    )
    _add_model_options(generate)
    generate.add_argument("--profile", help="profile JSON (default: the model's bundled profile)")
    generate.add_argument("--file", help="UTF-8 text file to ask about (default: the bundled document)")
    generate.add_argument("--question", help="the question (default: one about the document)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    generate.add_argument("--dense", action="store_true", help="use plain dense attention, to compare")
    generate.set_defaults(func=cmd_generate)

    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate per-head budgets for a model -> a profile JSON",
        description="One forward pass over a calibration text; writes the profile that `tca generate "
        "--profile` and tca.apply use. Defaults: TCAConfig.for_model(model), tau 0.9, the bundled text.",
    )
    _add_model_options(calibrate)
    calibrate.add_argument("--text", help="UTF-8 calibration text (default: the bundled one)")
    calibrate.add_argument("--tau", type=float, help="retained attention threshold in (0, 1] (default: 0.9)")
    calibrate.add_argument("--window", type=int, help="local window in tokens (default: per model)")
    calibrate.add_argument("--block", type=int, help="block size in tokens (default: per model)")
    calibrate.add_argument("--alpha", type=float, help="redundancy weight in [0, 1] (default: 0.5)")
    calibrate.add_argument(
        "--retrieval-threshold",
        help="retrieval score from which a head keeps every token, in (0, 1], or 'off' (default: 0.03)",
    )
    calibrate.add_argument(
        "--max-tokens", type=int, default=4096, help="text truncated to this (default: 4096)"
    )
    calibrate.add_argument(
        "--out", default="profile.tca.json", help="where to write (default: profile.tca.json)"
    )
    calibrate.set_defaults(func=cmd_calibrate)

    profile = commands.add_parser("profile", help="inspect profiles", description="Inspect profiles.")
    profile_commands = profile.add_subparsers(dest="profile_command", metavar="COMMAND", required=True)
    show = profile_commands.add_parser(
        "show",
        help="keep ratios per layer and KV head: a table, and a PNG heatmap",
        description="Print each layer's keep ratios per KV head at a context length (min / median / max, "
        "dense heads) and optionally write a heatmap (needs matplotlib).",
    )
    show.add_argument("path", help="profile JSON")
    show.add_argument("--png", help="also write a heatmap PNG here")
    show.add_argument("--length", type=int, help="context length in tokens (default: the calibration length)")
    show.set_defaults(func=cmd_profile_show)
    _add_eval_parser(commands)
    return parser


def _add_eval_parser(commands: Any) -> None:
    from ..eval.spec import ALL_METHODS, CALIBRATIONS, EvalSpec  # light: no torch

    default = EvalSpec()
    evaluate = commands.add_parser(
        "eval",
        help="every method on a long-context task suite (JSON lines, resumable)",
        description="Answer seeded long-context tasks (RULER-style) and score perplexity under full "
        "attention, TCA at each tau and each baseline at each kept fraction, on the same prompts. One "
        "JSON line per sample is appended to --out as it goes; run the same command again to resume.",
    )
    _add_model_options(evaluate)
    evaluate.add_argument(
        "--methods", nargs="+", default=default.methods, help=f"from: {' '.join(ALL_METHODS)}"
    )
    evaluate.add_argument(
        "--tasks", nargs="+", default=default.tasks, help="default: all tasks and perplexity"
    )
    evaluate.add_argument("--lengths", nargs="+", type=int, default=default.lengths)
    evaluate.add_argument("--samples", type=int, default=default.samples, help="samples per task and length")
    evaluate.add_argument("--kept-fractions", nargs="+", type=float, default=default.kept_fractions)
    evaluate.add_argument("--taus", nargs="+", type=float, default=default.taus, help="TCA thresholds")
    evaluate.add_argument(
        "--settings",
        nargs="+",
        help="run exactly these settings, in order (e.g. full tca@tau0.9 snapkv@0.3) instead of "
        "--methods x --taus x --kept-fractions; a tca setting may change TCAConfig fields: "
        "tca@tau0.9,local_window=256,retrieval_threshold=off",
    )
    evaluate.add_argument("--seed", type=int, default=default.seed, help="first sample seed")
    evaluate.add_argument(
        "--batch-size", type=int, default=default.batch_size, help="samples per batch (tasks mixed)"
    )
    evaluate.add_argument(
        "--batch-tokens", type=int, help="also cap each batch at this many prompt tokens (e.g. 262144)"
    )
    evaluate.add_argument("--calibration", default=default.calibration, choices=CALIBRATIONS)
    evaluate.add_argument("--out", required=True, help="JSON lines file (appended to; resumed)")
    evaluate.add_argument("--plots", help="folder for the summary, table and plots after the run")
    evaluate.set_defaults(func=cmd_eval)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    message = str(error) or type(error).__name__
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tca`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone prints; errors print on every rank
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except (UserError, ValueError, ModuleNotFoundError, OSError) as error:
        # ValueError covers ProfileError, UnsupportedModelError, ContextTooLongError, bad configs
        print(f"tca: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tca: interrupted", file=sys.stderr)
        return 130
