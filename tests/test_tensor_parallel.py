"""TCA under transformers' tensor parallelism (``tp_plan="auto"`` under torchrun), on the CPU with gloo.

The test writes a tiny model of every family TCA serves (Llama, Qwen2, Mistral, Qwen3, Gemma 3 with
its sliding-window layers; 8 query / 4 KV heads) and their profiles, runs
``tp_worker.py`` under ``torchrun`` with 2 ranks (and 4: marked slow, about 30 s of process start-up
on 2 cores), and sets every rank's results beside the
same scenarios run here in one process on the unsharded model (``tp_scenarios``): last-position
logits within 1e-3 of their scale, the same greedy tokens over two turns of 16 steps, the same kept
positions per (layer, KV head) in the compressed cache, the same whole-model statistics on every
rank, the same calibrated profile. A model whose 3 KV heads neither world size divides, and a
profile for another model, must give one clear error on every rank and no hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tp_scenarios
from transformers import AutoModelForCausalLM

from tca.cli import main
from tca.core.calibration import join_heads
from tca.core.profile import Profile
from tca.core.stats import RunStats
from tca.integrations.transformers import apply
from tca.integrations.transformers.layout import head_layout

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

SEED = 1
WORLD_SIZES = [2, pytest.param(4, marks=pytest.mark.slow)]
WORKER = Path(__file__).with_name("tp_worker.py")
SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A folder with the tiny models' checkpoints and profiles."""
    folder = tmp_path_factory.mktemp("tensor-parallel")
    for family in tp_scenarios.FAMILIES:
        model = tp_scenarios.tiny_lm(family, SEED)
        model.save_pretrained(folder / family)
        tp_scenarios.sparse_profile(model, SEED).save(folder / f"{family}.json")
    odd = tp_scenarios.tiny_lm("llama", SEED, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    odd.save_pretrained(folder / "odd")
    tp_scenarios.sparse_profile(odd, SEED).save(folder / "odd.json")
    return folder


@pytest.fixture(scope="module")
def launched(models) -> set[int]:
    return set()


@pytest.fixture
def folder(models, launched, world) -> Path:
    """The models' folder, holding each rank's results for ``world`` ranks (one torchrun per size)."""
    if world not in launched:
        result = torchrun(world, str(WORKER), str(models), str(SEED))
        assert result.returncode == 0, result.stderr[-6000:]
        launched.add(world)
    return models


def torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node world ARGS`` on CPU ranks (gloo); a hang fails after a timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    started = time.perf_counter()
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=240)
    print(f"torchrun with {world} ranks: {time.perf_counter() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def single_process(models) -> dict[str, dict]:
    """The scenarios in this process on the unsharded checkpoints (the reference)."""
    results = {}
    for family in tp_scenarios.FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32).eval()
        results[family] = tp_scenarios.tca_scenarios(model, Profile.load(models / f"{family}.json"), SEED)
        results[family]["calibration"] = tp_scenarios.calibration(model, SEED)
        results[family]["snapkv"] = tp_scenarios.method_scenario(model, SEED)
    return results


def rank_results(folder: Path, name: str, world: int) -> list[dict]:
    return [torch.load(folder / f"{name}-rank{r}-of{world}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("family", list(tp_scenarios.FAMILIES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_logits_and_greedy_tokens_equal_single_process(folder, single_process, family, world):
    reference = single_process[family]
    for rank, result in enumerate(rank_results(folder, family, world)):
        where = f"{family}, rank {rank} of {world}, seed {SEED}"
        for name in ("prefill_logits", "turn2_logits"):  # a left-padded prefill; a decode step after turn 2
            scale = reference[name].abs().max()
            error = (result[name] - reference[name]).abs().max()
            assert error <= 1e-3 * scale, f"{where}: {name} differ by {error:.2e} (scale {scale:.2f})"
        for turn in ("turn1_tokens", "turn2_tokens"):
            assert result[turn] == reference[turn], f"{where}: {turn}"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_graph_decode_steps_under_tensor_parallel_equal_single_process(folder, single_process, world):
    """``cuda_graphs=True`` under tensor parallelism (each rank's static step; uncaptured on the
    CPU): the tokens, kept positions and cache sizes of the eager single-process run."""
    reference = single_process["llama"]
    for rank, result in enumerate(rank_results(folder, "llama-graphs", world)):
        where = f"llama with cuda_graphs=True, rank {rank} of {world}, seed {SEED}"
        for turn in ("turn1_tokens", "turn2_tokens"):
            assert result[turn] == reference[turn], f"{where}: {turn}"
        for turn in ("turn1_kept", "turn2_kept"):
            assert all(rows == reference[turn][head] for head, rows in result[turn].items()), where
        for name in ("kept_fraction", "kv_bytes", "host_kv_bytes"):
            assert result["turn2_stats"][name] == reference["turn2_stats"][name], f"{where}: {name}"
        scale = reference["turn2_logits"].abs().max()
        assert (result["turn2_logits"] - reference["turn2_logits"]).abs().max() <= 1e-3 * scale, where


@pytest.mark.parametrize("family", list(tp_scenarios.FAMILIES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_each_rank_keeps_its_heads_as_one_process_does(folder, single_process, family, world):
    reference = single_process[family]
    results = rank_results(folder, family, world)
    for turn in ("turn1_kept", "turn2_kept"):
        held = [set(result[turn]) for result in results]
        assert sum(len(heads) for heads in held) == len(reference[turn]), "each head on one rank"
        assert set().union(*held) == set(reference[turn]), f"{family}, {world} ranks: {turn} heads"
        for rank, result in enumerate(results):
            assert len(held[rank]) == len(reference[turn]) // world
            for head, rows in result[turn].items():
                assert rows == reference[turn][head], (
                    f"{family}, rank {rank} of {world}: (layer, KV head) {head}"
                )


@pytest.mark.parametrize("family", list(tp_scenarios.FAMILIES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_stats_report_the_whole_model_on_every_rank(folder, single_process, family, world):
    reference = single_process[family]
    for rank, result in enumerate(rank_results(folder, family, world)):
        for moment in ("prefill_stats", "turn1_stats", "turn2_stats"):
            expected, got = reference[moment], result[moment]
            where = f"{family}, rank {rank} of {world}, {moment}"
            for name in ("kept_fraction", "pairs_fraction", "prefills", "kv_bytes", "dense_kv_bytes"):
                assert got[name] == expected[name], f"{where}: {name} {got[name]} != {expected[name]}"
            for name in ("host_kv_bytes", "managed_kv_bytes", "managed_dense_kv_bytes"):
                assert got[name] == expected[name], f"{where}: {name} {got[name]} != {expected[name]}"
            for name in ("kept_counts", "kept_entries", "context_tokens", "tca_pairs", "dense_pairs"):
                np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{where}: {name}")
            np.testing.assert_allclose(got["gamma"], expected["gamma"], atol=1e-5, err_msg=where)
    assert reference["turn1_stats"]["kept_fraction"] < 0.9, "the profile must drop tokens"


@pytest.mark.parametrize("family", list(tp_scenarios.FAMILIES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_calibration_under_tensor_parallel_gives_the_single_process_profile(
    folder, single_process, family, world
):
    expected = single_process[family]["calibration"]
    for rank, result in enumerate(rank_results(folder, family, world)):
        got = result["calibration"]
        where = f"{family}, rank {rank} of {world}"
        for name in ("mu", "sigma", "kept_tokens", "oracle_tokens"):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{where}: {name}")
        for name in ("retained", "retrieval"):
            np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=f"{where}: {name}")


@pytest.mark.parametrize("family", list(tp_scenarios.FAMILIES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_baseline_runs_alike_under_tensor_parallel(folder, single_process, family, world):
    expected = single_process[family]["snapkv"]
    results = [result["snapkv"] for result in rank_results(folder, family, world)]
    assert set().union(*(result["kept"] for result in results)) == set(expected["kept"])
    for rank, got in enumerate(results):
        where = f"snapkv, {family}, rank {rank} of {world}"
        assert got["tokens"] == expected["tokens"], where
        assert all(rows == expected["kept"][head] for head, rows in got["kept"].items()), where
        assert got["kept_fraction"] == expected["kept_fraction"], where
        assert got["kv_bytes"] == expected["kv_bytes"], where


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_user_errors_are_one_clear_line_on_every_rank(folder, world):
    """Both ranks' errors were raised by ``tca.apply`` before any work; the worker then met at a
    barrier, so no rank was left waiting in a collective."""
    for errors in rank_results(folder, "errors", world):
        message = errors["world_size"]
        assert message.startswith("HeadLayoutError: tensor parallelism over"), message
        assert f"over {world} processes splits the model's 3 KV heads" in message, message
        assert "divides 3 (1, 3)" in message and "\n" not in message, message
        assert errors["profile"].startswith("ProfileError: this profile was calibrated for another model")
        assert "architecture: profile 'llama', model 'qwen2'" in errors["profile"]


@pytest.mark.slow
def test_tca_commands_under_torchrun(tmp_path, capsys):
    """``tca calibrate`` writes one profile, the one a single process writes; ``tca generate`` prints
    once, what a single process prints; a world size that splits KV heads is one line per rank."""
    tokenizer = tp_scenarios.char_tokenizer()
    for name, changes in (
        ("llama", {}),
        ("odd", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)),
    ):
        tp_scenarios.tiny_lm("llama", SEED, **changes).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 33)
    calibrate = ["calibrate", "--text", str(text), "--window", "32", "--block", "16"]
    generate = ["generate", "--file", str(text), "--max-new-tokens", "8"]
    model = ["--model", str(tmp_path / "llama")]

    assert main([*calibrate, *model, "--out", str(tmp_path / "one.json")]) == 0
    result = torchrun(2, "-m", "tca.cli", *calibrate, *model, "--out", str(tmp_path / "two.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("wrote ") == 1, result.stdout
    one, two = Profile.load(tmp_path / "one.json"), Profile.load(tmp_path / "two.json")
    np.testing.assert_array_equal(one.mu, two.mu)
    np.testing.assert_array_equal(one.sigma, two.sigma)

    capsys.readouterr()
    assert main([*generate, *model, "--profile", str(tmp_path / "one.json")]) == 0
    alone = capsys.readouterr().out.splitlines()
    result = torchrun(2, "-m", "tca.cli", *generate, *model, "--profile", str(tmp_path / "two.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    shown = result.stdout.splitlines()
    assert [line for line in shown if not line.startswith("time:")] == [
        line.replace("one.json", "two.json") for line in alone if not line.startswith("time:")
    ]

    result = torchrun(
        2, "-m", "tca.cli", *calibrate, "--model", str(tmp_path / "odd"), "--out", str(tmp_path / "odd.json")
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("tca: error:")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-4000:]
    assert all("tensor parallelism over 2 processes splits the model's 3 KV heads" in e for e in errors)
    assert not (tmp_path / "odd.json").exists()


# ---- one process: the layout and the merging that the ranks rely on ---------------------------------------


def test_one_process_holds_every_head():
    layout = head_layout(tp_scenarios.tiny_lm("qwen2", SEED))
    assert layout.kv_heads == (0, 1, 2, 3) and layout.query_heads == tuple(range(8))
    assert (layout.rank, layout.world_size, layout.sharded) == (0, 1, False)
    assert layout.layers == (0, 1) and layout.manages(1) and not layout.manages(2)
    assert layout.gather("mine") == [((0, 1, 2, 3), "mine")]


def split_stats(stats: RunStats, heads: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], RunStats]]:
    """``stats`` cut into parts over ``heads`` as ranks would record them (bytes split unevenly)."""
    group = stats.n_heads // stats.n_kv_heads
    parts = []
    for i, kv in enumerate(heads):
        part = RunStats(stats.n_layers, len(kv), len(kv) * group)
        query = [g * group + j for g in kv for j in range(group)]
        for name in ("kept_counts", "kept_entries", "tca_pairs"):
            setattr(part, name, getattr(stats, name)[:, list(kv)])
        part.gamma, part.error_bound = stats.gamma[:, query], stats.error_bound[:, query]
        part.context_tokens, part.dense_pairs, part.prefills = stats.context_tokens, stats.dense_pairs, 1
        part.kv_bytes = stats.kv_bytes - 100 if i == 0 else 100 // (len(heads) - 1)
        parts.append((kv, part))
    return parts


def test_gathered_stats_equal_the_whole_model_whatever_the_rank_order():
    model = tp_scenarios.tiny_lm("llama", SEED)
    ids = tp_scenarios.random_ids(SEED, 120).view(1, -1)
    with torch.no_grad(), apply(model, tp_scenarios.sparse_profile(model, SEED)) as run:
        model(ids)
    whole = run.stats
    whole.kv_bytes = 1000
    gathered = RunStats(whole.n_layers, whole.n_kv_heads, whole.n_heads)
    gathered.gather_from(split_stats(whole, [(2, 3), (0, 1)]))
    for name in ("kept_counts", "kept_entries", "tca_pairs", "gamma", "error_bound", "context_tokens"):
        np.testing.assert_array_equal(getattr(gathered, name), getattr(whole, name), err_msg=name)
    assert gathered.kept_fraction == whole.kept_fraction < 1
    assert gathered.pairs_fraction == whole.pairs_fraction and gathered.kv_bytes == 1000
    with pytest.raises(ValueError, match="not each of 4 once"):
        RunStats(2, 4, 8).gather_from(split_stats(whole, [(0, 1), (0, 1)]))


def test_join_heads_puts_each_part_at_its_heads():
    values = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(SEED))
    parts = [((4, 5), values[:, 4:]), ((0, 1), values[:, :2]), ((2, 3), values[:, 2:4])]
    assert torch.equal(join_heads(parts, 1), values)
    with pytest.raises(ValueError, match="not each of 6 once"):
        join_heads([((0, 1, 2), values[:, :3]), ((2, 3, 4), values[:, 2:5])], 1)
