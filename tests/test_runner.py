"""The evaluation harness: baselines inside tca.apply at exact budgets, resumable JSON lines, and the
real model on real prompts (exact top-k never below random drop)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed
from tiny_models import TINY, left_padded, tiny_llama

from tca.eval.rows import ResultsBusyError, exclusive, load_rows
from tca.eval.runner import Evaluator, append_rows, read_done
from tca.eval.spec import BASELINES, EvalSpec, Setting
from tca.integrations.transformers import apply
from tca.methods import METHODS, MethodSelector, budget_for


@pytest.mark.randomised
@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_baseline_cache_holds_exactly_its_budget(method):
    seed = fresh_seed()
    model = tiny_llama(seed)
    lengths = [301, 230]
    gen = torch.Generator().manual_seed(seed)
    ids, mask, _ = left_padded([torch.randint(1, TINY["vocab_size"], (n,), generator=gen) for n in lengths])
    selector = MethodSelector(model, method, 0.3)
    window = selector.config.effective_window
    with torch.no_grad(), apply(model, selector) as run:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    for layer in run.cache.layers:
        for head in layer.heads:
            for b, n in enumerate(lengths):
                kept = budget_for(0.3, n, window) + window
                assert int(head.lengths[b]) == kept, f"seed {seed}, {method}, row {b}"
                stored = head.positions[b, :kept]
                assert stored.min() >= ids.shape[1] - n, "a padding token was kept"


def test_method_selector_rejects_a_bad_fraction():
    model = tiny_llama(0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="kept_fraction"):
            MethodSelector(model, "snapkv", bad)
    with pytest.raises(ValueError, match="unknown selection method 'nope'"):
        MethodSelector(model, "nope", 0.3)


def test_spec_errors_name_the_value():
    for change, name in (
        ({"methods": ["tca", "magic"]}, "magic"),
        ({"tasks": ["niah_single_number", "sorting"]}, "sorting"),
        ({"calibration": "poetry"}, "poetry"),
        ({"taus": [1.2]}, "1.2"),
        ({"kept_fractions": [0.0]}, "0.0"),
    ):
        with pytest.raises(ValueError, match=name):
            EvalSpec(**change).check()


def test_spec_names_every_method():
    assert BASELINES == METHODS


def test_settings_order_and_keys():
    spec = EvalSpec(methods=["snapkv", "tca", "full"], kept_fractions=[0.5, 0.1], taus=[0.9, 0.5])
    keys = [s.key for s in spec.settings()]
    assert keys == ["full", "tca@tau0.9", "tca@tau0.5", "snapkv@0.1", "snapkv@0.5"]
    assert Setting("random", kept_fraction=0.25).key == "random@0.25"


@pytest.mark.parametrize(
    "key",
    [
        "full",
        "tca@tau0.9",
        "tca@tau0.35",
        "tca@tau0.9,alpha=0.25,local_window=256,retrieval_threshold=off",
        "snapkv@0.1",
        "random@0.25",
    ],
)
def test_setting_keys_parse_back(key):
    assert Setting.parse(key).key == key


def test_tca_options_are_typed_and_sorted():
    setting = Setting.parse("tca@tau0.8,retrieval_threshold=0.03,block_size=32")
    assert setting.options == (("block_size", 32), ("retrieval_threshold", 0.03))
    assert (
        isinstance(setting.options[0][1], int)
        and setting.key == "tca@tau0.8,block_size=32,retrieval_threshold=0.03"
    )


@pytest.mark.parametrize(
    "key",
    [
        "tca@0.9",
        "snapkv",
        "bogus@0.1",
        "full@0.1",
        "tca@tauX",
        "tca",
        "tca@tau0.9,",
        "tca@tau0.9,alpha",
        "tca@tau0.9,alpha=x",
        "tca@tau0.9,tau=0.5",
        "tca@tau0.9,alpha=0.1,alpha=0.2",
    ],
)
def test_bad_setting_keys_name_the_key(key):
    with pytest.raises(ValueError, match=f"setting '{key}'"):
        Setting.parse(key)


@pytest.mark.parametrize(
    "key, message",
    [
        ("tca@tau0.9,alpha=2", "alpha must be in"),
        ("tca@tau0.9,local_window=0.5", "local_window must be an integer"),
        ("tca@tau0.9,retrieval_threshold=0", "retrieval_threshold must be in"),
    ],
)
def test_out_of_range_tca_options_name_the_setting_and_the_field(key, message):
    with pytest.raises(ValueError, match=f"setting '{key}': {message}"):
        EvalSpec(only=[key]).check()


def test_only_runs_the_named_settings_in_order_and_checks_them():
    spec = EvalSpec(only=["snapkv@0.3", "full", "tca@tau0.5", "full"])
    spec.check()
    assert [s.key for s in spec.settings()] == ["snapkv@0.3", "full", "tca@tau0.5"]
    with pytest.raises(ValueError, match="tau must be in"):
        EvalSpec(only=["tca@tau1.5"]).check()
    with pytest.raises(ValueError, match="kept fractions"):
        EvalSpec(only=["random@0"]).check()


def test_read_done_cuts_a_half_written_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"setting": "full", "task": "t", "length": 8, "seed": s, "score": s} for s in range(3)]
    append_rows(path, rows)
    complete = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(b'{"setting": "full", "task": "t", "len')
    assert read_done(path) == {("full", "t", 8, s) for s in range(3)}
    assert path.read_bytes() == complete
    assert read_done(tmp_path / "missing.jsonl") == set()


@pytest.fixture(scope="module")
def smollm2():
    from tca.bundled.models import load_model

    return load_model("smollm2")


def test_batch_for_caps_by_tokens():
    spec = EvalSpec(batch_size=100, batch_tokens=10_000)
    assert [spec.batch_for(n) for n in (1000, 4096, 20_000)] == [10, 2, 1]
    assert EvalSpec(batch_size=7).batch_for(4096) == 7
    with pytest.raises(ValueError, match="batch tokens"):
        EvalSpec(batch_tokens=0).check()


def test_batches_mix_tasks_once_each_and_never_mix_turn_counts(smollm2):
    """Every pending (task, seed) lands in exactly one batch; a batch holds one kind of sample."""
    model, tokenizer = smollm2
    tasks = ["niah_single_number", "multi_turn_needle", "qa_document", "perplexity"]
    spec = EvalSpec(methods=["full"], tasks=tasks, lengths=[1024], samples=3, batch_size=4, batch_tokens=3000)
    evaluator = Evaluator(model, tokenizer, spec, progress=False)
    batches = evaluator._batches(Setting("full"), 1024, done={("full", "qa_document", 1024, 1)})
    pairs = [pair for batch in batches for pair in batch]
    assert sorted(pairs) == sorted({(t, s) for t in tasks for s in range(3)} - {("qa_document", 1)})
    assert all(1 <= len(batch) <= 2 for batch in batches)  # 3000 // 1024 = 2 per batch
    for batch in batches:
        kinds = {t if t == "perplexity" else len(evaluator.sample(t, 1024, s).turns) for t, s in batch}
        assert len(kinds) == 1, batch
    assert any(len({t for t, _ in batch}) > 1 for batch in batches)  # tasks do mix


@pytest.mark.slow
def test_resume_after_interruption_loses_and_repeats_nothing(smollm2, tmp_path):
    model, tokenizer = smollm2
    spec = EvalSpec(
        methods=["full", "random"], tasks=["perplexity"], lengths=[300], samples=3, kept_fractions=[0.3]
    )
    spec.batch_size = 1
    out = tmp_path / "eval.jsonl"
    for count, _ in enumerate(Evaluator(model, tokenizer, spec, progress=False).run(out), 1):
        if count == 2:
            break  # interrupted after two rows
    first = out.read_bytes()
    with out.open("ab") as handle:
        handle.write(b'{"setting": "random@0.3", "ta')  # and in the middle of a write
    new = list(Evaluator(model, tokenizer, spec, progress=False).run(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["setting"], r["task"], r["length"], r["seed"]) for r in lines]
    assert len(keys) == len(set(keys)) == 6 and len(new) == 4
    assert out.read_bytes().startswith(first)
    assert {(s, "perplexity", 300, seed) for s in ("full", "random@0.3") for seed in range(3)} == set(keys)
    assert list(Evaluator(model, tokenizer, spec, progress=False).run(out)) == []


@pytest.mark.slow
def test_exact_topk_never_below_random_drop(smollm2, tmp_path):
    """The harness's own sanity check: on the same prompts, the oracle of single-query selection
    (exact top-k by the last query) scores at least as well as random dropping at the same budget."""
    model, tokenizer = smollm2
    spec = EvalSpec(
        methods=["topk_last", "random"],
        tasks=["niah_single_number", "perplexity"],
        lengths=[768],
        samples=3,
        kept_fractions=[0.2],
    )
    rows = list(Evaluator(model, tokenizer, spec, progress=False).run(tmp_path / "eval.jsonl"))

    def total(method, field):
        return sum(r[field] for r in rows if r["method"] == method and r.get(field) is not None)

    assert total("topk_last", "score") >= total("random", "score")
    assert total("topk_last", "nll") <= total("random", "nll")


def test_a_tca_setting_with_options_is_calibrated_with_them(smollm2):
    """The profile behind ``tca@tau0.8,...`` equals ``tca.calibrate`` with those fields, run apart."""
    from tca.core.config import TCAConfig
    from tca.eval.runner import calibration_text
    from tca.integrations.transformers import calibrate

    model, tokenizer = smollm2
    spec = EvalSpec(calibration_tokens=900)
    evaluator = Evaluator(model, tokenizer, spec, progress=False)
    setting = Setting.parse("tca@tau0.8,block_size=32,local_window=128,retrieval_threshold=off")
    profile = evaluator.selector(setting)
    config = TCAConfig.for_model(model).replace(
        tau=0.8, block_size=32, local_window=128, retrieval_threshold=None
    )
    alone = calibrate(model, tokenizer, calibration_text("prose"), config, 900, progress=False)
    assert profile.config == alone.config == config
    for field in ("mu", "sigma", "kept_tokens", "oracle_tokens"):
        np.testing.assert_array_equal(getattr(profile, field), getattr(alone, field), err_msg=field)
    default = evaluator.selector(Setting.parse("tca@tau0.8"))
    assert default.config.retrieval_threshold == TCAConfig().retrieval_threshold
    assert not np.array_equal(default.mu, profile.mu)


def test_read_done_keeps_every_row_after_a_blank_or_garbage_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"setting": "full", "task": "t", "length": 8, "seed": s, "score": s} for s in range(4)]
    text = json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n{garbage\n"
    text += "".join(json.dumps(row) + "\n" for row in rows[2:])
    path.write_text(text)
    with pytest.warns(UserWarning, match="line 4"):
        assert read_done(path) == {("full", "t", 8, s) for s in range(4)}
    assert path.read_text() == text  # nothing deleted, nothing rewritten
    with pytest.warns(UserWarning):
        assert load_rows(path) == rows  # the plot reader agrees on what a row is


def test_read_done_ends_a_complete_last_row_with_a_newline(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = {"setting": "full", "task": "t", "length": 8, "seed": 0}
    path.write_text(json.dumps(row))
    assert read_done(path) == {("full", "t", 8, 0)}
    append_rows(path, [row | {"seed": 1}])
    assert [json.loads(line)["seed"] for line in path.read_text().splitlines()] == [0, 1]


def test_a_second_writer_of_one_file_is_refused(tmp_path):
    out = tmp_path / "rows.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ResultsBusyError, match="another `tca eval`"), exclusive(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(out), exclusive(out):  # free again, and re-entrant within one process
        pass


HOLD_LOCK = """
import sys, time
from pathlib import Path
from tca.eval.rows import exclusive
with exclusive(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_the_bundled_profile_is_reused_only_by_the_setting_it_fits(smollm2, tmp_path):
    from tca.bundled.profiles import profile_for

    model, tokenizer = smollm2
    bundled = profile_for("smollm2")
    spec = EvalSpec(only=["tca@tau0.9", "full"], tasks=["niah_single_number"], lengths=[300], samples=2)
    evaluator = Evaluator(model, tokenizer, spec, progress=False, profiles=[(bundled, "bundled")])
    assert evaluator.profile(0.9) is bundled  # no calibration
    assert evaluator._calibrations == {}
    assert evaluator.reused(0.8) is None
    assert evaluator.reused(0.9, (("local_window", 256),)) is None
    out = tmp_path / "rows.jsonl"
    assert evaluator.pending(out) == 4
    append_rows(out, [{"setting": "full", "task": "niah_single_number", "length": 300, "seed": 0}])
    assert evaluator.pending(out) == 3
