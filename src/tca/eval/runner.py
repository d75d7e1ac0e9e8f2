"""The evaluation runner behind ``tca eval``: every method on the same prompts, resumable.

A *setting* is one attention configuration: ``full`` (dense), ``tca`` at a tau (a profile
calibrated in-process at that tau), or a baseline at a kept fraction (``tca.methods``). For each
length, the samples of every task (``tca.eval.tasks``, seeded) are answered under every setting,
in batches with left padding that mix tasks (samples with the same number of turns run together),
and one JSON line per (setting, task, length, seed) is appended to the output and flushed after
each batch (``tca.eval.rows``). An interrupted run picks up where it stopped: rows already
written are read back and skipped, a half-written last line is dropped, nothing is written twice;
a second process on the same output is refused while the first holds its lock.

Multi-turn samples are answered turn by turn, each turn re-prefilling the whole conversation
so far (batched); carrying one compressed cache across turns is measured by
``benchmarks/needle.py``. The pseudo-task ``perplexity`` scores real prose
windows (prefill only) under each setting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..bundled import texts
from ..core.config import TCAConfig
from ..integrations.transformers import apply, measure_calibration
from ..methods import MethodSelector
from .fidelity import document_windows, token_nll
from .rows import append_rows as append_rows  # re-exported with read_done and row_key
from .rows import exclusive
from .rows import read_done as read_done
from .rows import row_key as row_key
from .spec import PERPLEXITY, EvalSpec, Setting
from .tasks import ANSWER_TOKENS, TaskSample, make_sample, score


def calibration_text(kind: str) -> str:
    """The bundled calibration text (prose), or the bundled text of another kind (docs, code)."""
    if kind == "prose":
        return texts.calibration_text()
    return next(iter(texts.evaluation_texts(kind).values()))


class Evaluator:
    """Answers task samples under settings with one model (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        spec: EvalSpec,
        progress: bool = True,
        profiles: Sequence[tuple[Any, str]] = (),
    ):
        """``profiles``: ``(Profile, source)`` pairs to reuse instead of calibrating: a TCA setting
        whose configuration (tau and options on the model's defaults) equals a profile's runs with it."""
        spec.check()
        self.model, self.tokenizer, self.spec, self.progress = model, tokenizer, spec, progress
        self.given = list(profiles)
        self._calibrations: dict[tuple, Any] = {}  # by the setting's options
        self._windows: dict[int, list[torch.Tensor]] = {}
        self._profiles: dict[tuple, Any] = {}  # by (tau, options)
        self._samples: dict[tuple[str, int, int], TaskSample] = {}

    def config_of(self, tau: float, options: tuple = ()) -> TCAConfig:
        """The TCAConfig a tca setting runs: the model's defaults, its tau and options."""
        return TCAConfig.for_model(self.model).replace(tau=tau, **dict(options))

    def reused(self, tau: float, options: tuple = ()) -> tuple[Any, str] | None:
        """The given ``(profile, source)`` that fits the setting (same configuration but for
        ``query_chunk``, which changes no result), or None: the setting is calibrated."""
        wanted = self.config_of(tau, options).replace(query_chunk=1)
        for profile, source in self.given:
            if profile.config.replace(query_chunk=1) == wanted:
                return profile, source
        return None

    def profile(self, tau: float, options: tuple = ()):
        """TCA profile at ``tau`` with the TCAConfig ``options`` of a setting: a given profile that
        fits, else one calibration pass per set of options and one profile per tau, both cached."""
        if (tau, options) in self._profiles:
            return self._profiles[(tau, options)]
        fitting = self.reused(tau, options)
        if fitting is not None:
            self._profiles[(tau, options)] = fitting[0]
            return fitting[0]
        if options not in self._calibrations:
            config = TCAConfig.for_model(self.model).replace(**dict(options))
            self._calibrations[options] = measure_calibration(
                self.model,
                self.tokenizer,
                calibration_text(self.spec.calibration),
                config,
                self.spec.calibration_tokens,
                progress=False,
            )
        self._profiles[(tau, options)] = self._calibrations[options].profile(tau)
        return self._profiles[(tau, options)]

    def selector(self, setting: Setting):
        """What ``tca.apply`` takes for ``setting`` (None: dense)."""
        if setting.method == "full":
            return None
        if setting.method == "tca":
            return self.profile(setting.tau, setting.options)
        return MethodSelector(self.model, setting.method, setting.kept_fraction)

    def sample(self, task: str, length: int, seed: int) -> TaskSample:
        """The task sample (made once per run: every setting answers the same prompt)."""
        key = (task, length, seed)
        if key not in self._samples:
            self._samples[key] = make_sample(task, self.tokenizer, length, seed)
        return self._samples[key]

    def pending(self, out: Path) -> int:
        """How many samples are not yet in ``out`` (0: a resumed run has nothing left to do)."""
        return sum(len(batch) for *_, batch in self._work(read_done(out)))

    def _work(self, done: set[tuple]) -> list[tuple[Setting, int, list[tuple[str, int]]]]:
        """The pending batches, setting by setting, so an interrupted run has whole settings to compare."""
        return [
            (setting, length, batch)
            for setting in self.spec.settings()
            for length in self.spec.lengths
            for batch in self._batches(setting, length, done)
        ]

    def run(self, out: Path) -> Iterator[dict[str, Any]]:
        """Run everything not yet in ``out`` (JSONL), appending as it goes; yields each new row.

        Holds ``out``'s lock throughout (``ResultsBusyError`` when another process holds it)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(out):
            work = self._work(read_done(out))
            total = sum(len(batch) for *_, batch in work)
            bar = tqdm(total=total, desc="eval", unit="sample", disable=not self.progress)
            for setting, length, batch in work:
                bar.set_postfix_str(f"{setting.key} {length}")
                rows = self._rows(setting, length, batch)
                append_rows(out, rows)
                bar.update(len(batch))
                yield from rows
            bar.close()

    def _batches(self, setting: Setting, length: int, done: set[tuple]) -> list[list[tuple[str, int]]]:
        """The pending (task, seed) pairs of one setting and length, in batches that run together:
        perplexity windows apart, task samples grouped by their number of turns."""
        size = self.spec.batch_for(length)
        groups: dict[Any, list[tuple[str, int]]] = {}
        for task in self.spec.tasks:
            for seed in range(self.spec.seed, self.spec.seed + self.spec.samples):
                if (setting.key, task, length, seed) in done:
                    continue
                kind = PERPLEXITY if task == PERPLEXITY else len(self.sample(task, length, seed).turns)
                groups.setdefault(kind, []).append((task, seed))
        return [items[lo : lo + size] for items in groups.values() for lo in range(0, len(items), size)]

    def _rows(self, setting: Setting, length: int, batch: list[tuple[str, int]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        if batch[0][0] == PERPLEXITY:
            results = self._perplexity(setting, length, [seed for _, seed in batch])
        else:
            results = self._answers(setting, [self.sample(task, length, seed) for task, seed in batch])
        seconds = (time.perf_counter() - started) / len(batch)
        base = {"setting": setting.key, "method": setting.method, "kept_fraction": setting.kept_fraction}
        base |= {"tau": setting.tau, "length": length, "seconds": seconds}
        base["calibration"] = self.spec.calibration if setting.method == "tca" else None
        if setting.method == "tca":  # where the profile came from: a reused file, or calibrated here
            fitting = self.reused(setting.tau, setting.options)
            base["profile"] = "calibrated" if fitting is None else fitting[1]
        return [
            base | {"task": task, "seed": seed} | result
            for (task, seed), result in zip(batch, results, strict=True)
        ]

    def _answers(self, setting: Setting, samples: list[TaskSample]) -> list[dict[str, Any]]:
        """Answer a batch turn by turn; the last turn's answer is scored."""
        conversations: list[list[dict[str, str]]] = [[] for _ in samples]
        for turn in range(len(samples[0].turns)):
            for conversation, sample in zip(conversations, samples, strict=True):
                conversation.append({"role": "user", "content": sample.turns[turn]})
            answers, kv = self._generate(setting, conversations)
            for conversation, answer in zip(conversations, answers, strict=True):
                conversation.append({"role": "assistant", "content": answer})
        return [
            {
                "score": score(sample, conversation[-1]["content"]),
                "answer": conversation[-1]["content"],
                **kv,
                "depth": sample.depths[0] if sample.depths else None,
            }
            for sample, conversation in zip(samples, conversations, strict=True)
        ]

    def _generate(
        self, setting: Setting, conversations: list[list[dict[str, str]]]
    ) -> tuple[list[str], dict[str, float]]:
        """Greedy answers for a batch of conversations (left padding); returns the answers and the KV
        fractions: ``kv_fraction`` over every layer (a sliding layer's window cache included) and
        ``managed_kv_fraction`` over the layers TCA manages."""
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
                kv = {"kv_fraction": 1.0, "managed_kv_fraction": 1.0}
            else:
                with apply(self.model, selector, keep_history=False) as run:
                    out = self.model.generate(**batch, **kwargs)
                kv = {
                    "kv_fraction": run.stats.kv_bytes / max(run.stats.dense_kv_bytes, 1),
                    "managed_kv_fraction": run.stats.managed_kv_fraction,
                }
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return answers, kv

    def _perplexity(self, setting: Setting, length: int, seeds: list[int]) -> list[dict[str, Any]]:
        """NLL of the second half of a real-prose window per seed (prefill only, one batch)."""
        if length not in self._windows:  # seeded windows, seed i is the i-th (tokenizing once)
            count = self.spec.seed + self.spec.samples
            self._windows[length] = document_windows(self.tokenizer, length, count, 0)
        ids = torch.cat([self._windows[length][seed] for seed in seeds])  # (n, length)
        selector = self.selector(setting)
        if selector is None:
            nll, kv_fraction = token_nll(self.model, ids), 1.0
        else:
            with apply(self.model, selector) as run:
                nll = token_nll(self.model, ids)
            kv_fraction = run.stats.kept_fraction
        half = nll[:, nll.shape[1] // 2 :]
        return [
            {
                "score": None,
                "nll": float(row.sum()),
                "tokens": len(row),
                "kv_fraction": kv_fraction,
                "managed_kv_fraction": kv_fraction,  # the kept fraction is over the managed layers
            }
            for row in half
        ]
