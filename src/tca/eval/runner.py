"""The evaluation runner behind ``tca eval``: every method on the same prompts, resumable.

A *setting* is one attention configuration: ``full`` (dense), ``tca`` at a tau (a profile
calibrated in-process at that tau), or a baseline at a kept fraction (``tca.methods``). For each
length and task, the samples (``tca.eval.tasks``, seeded) are answered under every setting, in
batches with left padding, and one JSON line per (setting, task, length, seed) is appended to the
output and flushed at once. An interrupted run picks up where it stopped: lines already written
are read back and skipped, a half-written last line is dropped, nothing is written twice.

Multi-turn samples are answered turn by turn, each turn re-prefilling the whole conversation
so far (batched); carrying one compressed cache across turns is measured by
``benchmarks/needle.py`` (issue 5's check). The pseudo-task ``perplexity`` scores real prose
windows (prefill only) under each setting.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import texts
from ..calibrate import calibration_ids, measure_retention, profile_from_retention
from ..config import TCAConfig
from ..hf import apply
from ..methods import MethodSelector
from ..retrieval import measure_retrieval
from .fidelity import prose_windows, score_window
from .spec import PERPLEXITY, EvalSpec, Setting
from .tasks import ANSWER_TOKENS, TaskSample, make_sample, score


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a result line (for resuming)."""
    return (row["setting"], row["task"], int(row["length"]), int(row["seed"]))


def read_done(path: Path) -> set[tuple]:
    """Keys of the complete lines already in ``path``; a half-written last line is cut off the file."""
    if not path.exists():
        return set()
    done, good_bytes = set(), 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                key = row_key(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break  # an interrupted write: it and anything after it is dropped
            if not line.endswith(b"\n"):
                break
            done.add(key)
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return done


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append JSON lines and push them to disk before returning."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def calibration_text(kind: str) -> str:
    """The bundled calibration text (prose), or the bundled text of another kind (docs, code)."""
    if kind == "prose":
        return texts.calibration_text()
    return next(iter(texts.evaluation_texts(kind).values()))


class Evaluator:
    """Answers task samples under settings with one model (see the module docstring)."""

    def __init__(self, model, tokenizer, spec: EvalSpec, progress: bool = True):
        spec.check()
        self.model, self.tokenizer, self.spec, self.progress = model, tokenizer, spec, progress
        self._retention: tuple | None = None
        self._windows: dict[int, list[torch.Tensor]] = {}
        self._profiles: dict[float, Any] = {}

    def profile(self, tau: float):
        """TCA profile at ``tau``: one calibration pass and one profile per tau, both cached."""
        if self._retention is None:
            text = calibration_text(self.spec.calibration)
            config = TCAConfig.for_model(self.model)
            ids = calibration_ids(self.tokenizer, text, config, 4096)
            retention = measure_retention(self.model, ids, config, progress=False)
            retrieval = measure_retrieval(self.model, ids, config, progress=False)
            self._retention = (retention, retrieval, config, ids.shape[-1], text)
        if tau not in self._profiles:
            retention, retrieval, config, tokens, text = self._retention
            self._profiles[tau] = profile_from_retention(
                retention, self.model, config.replace(tau=tau), tokens, text, retrieval
            )
        return self._profiles[tau]

    def selector(self, setting: Setting):
        """What ``tca.apply`` takes for ``setting`` (None: dense)."""
        if setting.method == "full":
            return None
        if setting.method == "tca":
            return self.profile(setting.tau)
        return MethodSelector(self.model, setting.method, setting.kept_fraction)

    def run(self, out: Path) -> Iterator[dict[str, Any]]:
        """Run everything not yet in ``out`` (JSONL), appending as it goes; yields each new row."""
        out.parent.mkdir(parents=True, exist_ok=True)
        done = read_done(out)
        jobs = [  # setting by setting, so an interrupted run has whole settings to compare
            (setting, length, task)
            for setting in self.spec.settings()
            for length in self.spec.lengths
            for task in self.spec.tasks
        ]
        bar = tqdm(jobs, desc="eval", disable=not self.progress)
        for setting, length, task in bar:
            seeds = [
                s
                for s in range(self.spec.seed, self.spec.seed + self.spec.samples)
                if (setting.key, task, length, s) not in done
            ]
            bar.set_postfix_str(f"{setting.key} {task} {length}")
            for lo in range(0, len(seeds), self.spec.batch_size):
                rows = self._rows(setting, task, length, seeds[lo : lo + self.spec.batch_size])
                append_rows(out, rows)
                yield from rows

    def _rows(self, setting: Setting, task: str, length: int, seeds: list[int]) -> list[dict[str, Any]]:
        base = {"setting": setting.key, "method": setting.method, "kept_fraction": setting.kept_fraction}
        base |= {"tau": setting.tau, "task": task, "length": length}
        base["calibration"] = self.spec.calibration if setting.method == "tca" else None
        started = time.perf_counter()
        if task == PERPLEXITY:
            results = self._perplexity(setting, length, seeds)
        else:
            samples = [make_sample(task, self.tokenizer, length, s) for s in seeds]
            results = self._answers(setting, samples)
        seconds = (time.perf_counter() - started) / len(seeds)
        return [base | {"seed": s, "seconds": seconds} | r for s, r in zip(seeds, results, strict=True)]

    def _answers(self, setting: Setting, samples: list[TaskSample]) -> list[dict[str, Any]]:
        """Answer a batch turn by turn; the last turn's answer is scored."""
        conversations: list[list[dict[str, str]]] = [[] for _ in samples]
        kv_fraction = 1.0
        for turn in range(len(samples[0].turns)):
            for conversation, sample in zip(conversations, samples, strict=True):
                conversation.append({"role": "user", "content": sample.turns[turn]})
            answers, kv_fraction = self._generate(setting, conversations)
            for conversation, answer in zip(conversations, answers, strict=True):
                conversation.append({"role": "assistant", "content": answer})
        return [
            {
                "score": score(sample, conversation[-1]["content"]),
                "answer": conversation[-1]["content"],
                "kv_fraction": kv_fraction,
                "depth": sample.depths[0] if sample.depths else None,
            }
            for sample, conversation in zip(samples, conversations, strict=True)
        ]

    def _generate(
        self, setting: Setting, conversations: list[list[dict[str, str]]]
    ) -> tuple[list[str], float]:
        """Greedy answers for a batch of conversations (left padding); returns (answers, KV fraction)."""
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.model.device
        )
        kwargs = {"max_new_tokens": ANSWER_TOKENS, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        selector = self.selector(setting)
        with torch.no_grad():
            if selector is None:
                out = self.model.generate(**batch, **kwargs)
                kv_fraction = 1.0
            else:
                with apply(self.model, selector, keep_history=False) as run:
                    out = self.model.generate(**batch, **kwargs)
                kv_fraction = run.stats.kv_bytes / max(run.stats.dense_kv_bytes, 1)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return answers, kv_fraction

    def _perplexity(self, setting: Setting, length: int, seeds: list[int]) -> list[dict[str, Any]]:
        """NLL of the second half of a real-prose window per seed (prefill only)."""
        rows = []
        if length not in self._windows:  # seeded windows, seed i is the i-th (tokenizing once)
            count = self.spec.seed + self.spec.samples
            self._windows[length] = prose_windows(self.tokenizer, texts.evaluation_texts(), length, count, 0)
        for seed in seeds:
            ids = self._windows[length][seed]
            selector = self.selector(setting)
            if selector is None:
                scores, kv_fraction = score_window(self.model, ids), 1.0
            else:
                with apply(self.model, selector) as run:
                    scores = score_window(self.model, ids)
                kv_fraction = run.stats.kept_fraction
            half = scores.nll[len(scores.nll) // 2 :]
            rows.append(
                {"score": None, "nll": float(half.sum()), "tokens": len(half), "kv_fraction": kv_fraction}
            )
        return rows
