"""``tca generate``: answer a question about a long document with TCA (or dense) and report the savings."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import MIB, UserError, add_model_options, check_model, load, read_text


def add_parser(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="answer a question about a long document with TCA",
        description="Answer a question about a long document with TCA (or --dense) and report the kept "
        "fraction, the KV memory saved and the time. With no arguments: the bundled SmolLM2, its "
        "bundled profile, and the opening of The War of the Worlds with a planted passcode.",
    )
    add_model_options(generate)
    generate.add_argument("--profile", help="profile JSON (default: the model's bundled profile)")
    generate.add_argument("--file", help="UTF-8 text file to ask about (default: the bundled document)")
    generate.add_argument("--question", help="the question (default: one about the document)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    generate.add_argument("--dense", action="store_true", help="use plain dense attention, to compare")
    generate.set_defaults(func=run)


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
    return Document(read_text(args.file, "--file"), question, None, args.file)


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


def run(args: argparse.Namespace) -> int:
    """Generate and print the answer, the kept fraction, the KV memory and the time; exit status 0."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    started = time.perf_counter()
    check_model(args.model)  # before looking for its profile: a missing model is the first thing to say
    document = _document(args)
    profile, profile_source = (None, "") if args.dense else _load_profile(args)
    model, tokenizer = load(args)
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
