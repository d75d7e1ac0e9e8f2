"""Asking a model questions about a document through its chat template, in one or two turns.

The two-turn form reuses one KV cache: the second turn's prompt is the first turn's tokens
(prompt and answer) followed by only the new turn's tokens, so the cache really carries the
conversation (a TCA cache re-selects from its host history at the new turn).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    """(1, n) prompt ids for ``messages`` with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _generate(model, ids: torch.Tensor, cache, max_new_tokens: int) -> torch.Tensor:
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if cache is not None:
        kwargs["past_key_values"] = cache
    return model.generate(
        ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device), **kwargs
    )


def ask(model, tokenizer, document: str, question: str, max_new_tokens: int = 32) -> str:
    """One turn: the document and the question in one user message; greedy answer text."""
    ids = chat_ids(tokenizer, [{"role": "user", "content": f"{document}\n\n{question}"}])
    out = _generate(model, ids, None, max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def ask_two_turns(
    model, tokenizer, document: str, first: str, second: str, cache=None, max_new_tokens: int = 32
) -> tuple[str, str]:
    """Turn 1: the document and ``first``; turn 2: ``second`` alone, on the same cache.

    ``cache``: the cache to carry (a ``TCACache`` from ``run.new_cache()``); None uses a
    transformers ``DynamicCache`` (dense).
    """
    cache = DynamicCache() if cache is None else cache
    turn1 = [{"role": "user", "content": f"{document}\n\n{first}"}]
    ids1 = chat_ids(tokenizer, turn1)
    out1 = _generate(model, ids1, cache, max_new_tokens)
    answer1 = tokenizer.decode(out1[0, ids1.shape[1] :], skip_special_tokens=True)
    rendered1 = tokenizer.apply_chat_template(turn1, tokenize=False, add_generation_prompt=True)
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": second}]
    rendered2 = tokenizer.apply_chat_template(turn2, tokenize=False, add_generation_prompt=True)
    suffix = rendered2[len(rendered1) + len(answer1) :]  # end of turn 1, then the new user turn
    eos_text = tokenizer.eos_token or ""
    if out1[0, -1].item() == tokenizer.eos_token_id and suffix.startswith(eos_text):
        suffix = suffix[len(eos_text) :]
    new_ids = tokenizer(suffix, return_tensors="pt", add_special_tokens=False)["input_ids"].to(out1.device)
    ids2 = torch.cat([out1, new_ids], dim=1)
    out2 = _generate(model, ids2, cache, max_new_tokens)
    return answer1, tokenizer.decode(out2[0, ids2.shape[1] :], skip_special_tokens=True)
