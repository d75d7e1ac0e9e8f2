"""TCAConfig validation and ``for_model``; Profile JSON round trip and every bad-input error."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from tca.core.config import TCAConfig
from tca.core.profile import FORMAT, Profile, ProfileError, model_fingerprint


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tau", 0),
        ("tau", 0.0),
        ("tau", 1.5),
        ("tau", -0.1),
        ("tau", math.nan),
        ("tau", math.inf),
        ("tau", "0.9"),
        ("tau", None),
        ("tau", True),
        ("alpha", -0.01),
        ("alpha", 1.01),
        ("alpha", math.nan),
        ("alpha", "0.5"),
        ("alpha", None),
        ("alpha", True),
        ("block_size", 0),
        ("block_size", -4),
        ("block_size", 2.0),
        ("block_size", True),
        ("block_size", "128"),
        ("local_window", -1),
        ("local_window", 1.5),
        ("local_window", False),
        ("candidates", 0),
        ("observation_queries", 0),
        ("query_chunk", 0),
        ("query_chunk", None),
        ("observation_max", -0.1),
        ("observation_max", 1.5),
        ("observation_max", True),
        ("continuation", 1.0),
        ("continuation", -0.5),
        ("continuation", "0.9"),
        ("retrieval_threshold", 0.0),
        ("retrieval_threshold", 1.5),
        ("retrieval_threshold", True),
        ("retrieval_threshold", "0.1"),
    ],
)
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError) as error:
        TCAConfig(**{field: value})
    message = str(error.value)
    assert field in message and repr(value) in message


def test_config_takes_numpy_numbers_and_stores_python_numbers(tmp_path):
    """Numbers from numpy (an array, a sweep) are numbers: np.int64 is an integer, and what is stored
    is a Python int/float, so that the config and a profile made with it save as JSON."""
    config = TCAConfig(
        local_window=np.int64(512), block_size=np.int32(64), tau=np.float32(0.9), alpha=np.float64(0.25)
    )
    assert (config.local_window, config.block_size, config.alpha) == (512, 64, 0.25)
    assert config.tau == pytest.approx(0.9, abs=1e-7)
    for name, kind in [("local_window", int), ("block_size", int), ("tau", float), ("alpha", float)]:
        assert type(getattr(config, name)) is kind, name
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    profile = dataclasses.replace(make_profile(), config=config)
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json").config == config
    assert type(TCAConfig(alpha=1, tau=1).tau) is float
    for field, value in [("local_window", np.float64(2.0)), ("block_size", np.bool_(True))]:
        with pytest.raises(ValueError, match=field):
            TCAConfig(**{field: value})


def test_config_defaults_and_edges():
    config = TCAConfig()
    assert (config.tau, config.block_size, config.local_window, config.alpha, config.candidates) == (
        0.9,
        128,
        4096,
        0.5,
        14,
    )
    assert TCAConfig(tau=1.0, alpha=0.0, local_window=0, block_size=1).effective_window == 1
    assert TCAConfig(alpha=1, tau=1).alpha == 1
    assert TCAConfig(local_window=7).effective_window == 7
    with pytest.raises(ValueError, match="tau"):
        config.replace(tau=2.0)
    assert TCAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        TCAConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tau = 0.5  # type: ignore[misc]


def expected_window_and_block(context: int) -> tuple[int, int]:
    """window: largest power of two <= context / 16, in [64, 4096]; block: window / 8, in [16, 128]."""
    power = 1
    while power * 2 <= context / 16:
        power *= 2
    window = min(4096, max(64, power))
    return window, min(128, max(16, window // 8))


@pytest.mark.parametrize("context", [1, 100, 1000, 1024, 2048, 4095, 8192, 32768, 131072, 10**6])
def test_for_model_rule(context):
    config = LlamaConfig(max_position_embeddings=context)
    made = TCAConfig.for_model(config)
    assert (made.local_window, made.block_size) == expected_window_and_block(context)


def test_for_model_examples_and_overrides():
    assert TCAConfig.for_model(LlamaConfig(max_position_embeddings=131072)).local_window == 4096
    smol = TCAConfig.for_model(LlamaConfig(max_position_embeddings=8192), tau=0.95)
    assert (smol.local_window, smol.block_size, smol.tau) == (512, 64, 0.95)

    class Holder:  # something with a .config, like a model
        config = LlamaConfig(max_position_embeddings=2048)

    assert TCAConfig.for_model(Holder()).local_window == 128
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TCAConfig.for_model(object())
    with pytest.raises(ValueError, match="tau"):
        TCAConfig.for_model(LlamaConfig(), tau=0)


# ---- Profile ------------------------------------------------------------------------------------------


def llama_config(**changes) -> LlamaConfig:
    settings = dict(
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        max_position_embeddings=2048,
        vocab_size=100,
    )
    settings.update(changes)
    return LlamaConfig(**settings)


def make_profile(seed: int = 0, config: LlamaConfig | None = None) -> Profile:
    config = config or llama_config()
    rng = np.random.default_rng(seed)
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    mu = rng.uniform(0.01, 0.8, shape)
    mu[0, 0] = math.inf
    return Profile(
        config=TCAConfig(tau=0.85, block_size=16, local_window=64),
        fingerprint=model_fingerprint(config),
        mu=mu,
        sigma=rng.choice([0.3, 1.0], shape),
        retained=rng.uniform(0.85, 1, shape),
        kept_tokens=rng.integers(0, 100, shape).astype(float),
        oracle_tokens=rng.integers(0, 100, shape).astype(float),
        calibration_tokens=321,
        text_sha256="ab" * 32,
        version="0.1.0",
        extra={"note": "test"},
        retrieval=rng.uniform(0, 1, shape) if seed % 2 else None,
    )


def gemma3_config(**changes) -> Gemma3TextConfig:
    """18 layers, a sliding window of 512 on five of every six (as Gemma 3 270M), head dim 256."""
    settings = dict(
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_size=64,
        sliding_window=512,
        vocab_size=100,
    )
    return Gemma3TextConfig(**{**settings, **changes})


def test_fingerprint():
    assert model_fingerprint(llama_config()) == {
        "architecture": "llama",
        "n_layers": 3,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "managed_layers": [0, 1, 2],
    }
    qwen = Qwen2Config(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=6, hidden_size=96)
    assert model_fingerprint(qwen) == {
        "architecture": "qwen2",
        "n_layers": 2,
        "n_heads": 6,
        "n_kv_heads": 6,
        "head_dim": 16,
        "managed_layers": [0, 1],
    }
    # Gemma 3: the full-attention layers only (every sixth), head_dim from the config
    assert model_fingerprint(gemma3_config()) == {
        "architecture": "gemma3_text",
        "n_layers": 18,
        "n_heads": 4,
        "n_kv_heads": 1,
        "head_dim": 256,
        "managed_layers": [5, 11, 17],
    }
    pattern = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    assert model_fingerprint(gemma3_config(num_hidden_layers=4, layer_types=pattern))["managed_layers"] == [
        1,
        2,
    ]
    # Qwen2 with its sliding window switched on: the layers from max_window_layers slide
    qwen = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert model_fingerprint(qwen)["managed_layers"] == [0]
    # without layer_types: a Mistral with a window slides everywhere, without one it is full
    assert model_fingerprint(MistralConfig(num_hidden_layers=2))["managed_layers"] == []
    assert model_fingerprint(MistralConfig(num_hidden_layers=2, sliding_window=None))["managed_layers"] == [
        0,
        1,
    ]


def assert_same_profile(a: Profile, b: Profile) -> None:
    assert a.config == b.config and a.fingerprint == b.fingerprint
    for name in ("mu", "sigma", "retained", "kept_tokens", "oracle_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.retrieval is None) == (b.retrieval is None)
    assert a.retrieval is None or np.array_equal(a.retrieval, b.retrieval)
    assert (a.calibration_tokens, a.text_sha256, a.version, a.extra) == (
        b.calibration_tokens,
        b.text_sha256,
        b.version,
        b.extra,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_profile_round_trip(tmp_path, seed):
    profile = make_profile(seed)
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert_same_profile(profile, loaded)
    assert math.isinf(loaded.mu[0, 0])
    assert json.loads(path.read_text())["heads"]["mu"][0][0] is None
    assert not (tmp_path / "profile.json.tmp").exists()
    loaded.check_fits(llama_config())
    mu, sigma = loaded.head_config(1)
    assert mu.tolist() == profile.mu[1].tolist() and sigma.tolist() == profile.sigma[1].tolist()


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "a-directory"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        make_profile().save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"]
    assert list(folder.iterdir()) == []


def test_keep_ratios_dense_heads_keep_everything():
    profile = make_profile()
    ratios = profile.keep_ratios(1000)
    assert ratios.shape == (3, 2) and ratios[0, 0] == 1.0
    assert ((ratios > 0) & (ratios <= 1)).all()
    assert (profile.keep_ratios(10) == 1.0).all(), "a context within the window keeps everything"


def write(tmp_path, text: str):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return path


def damaged(tmp_path, edit) -> ProfileError:
    data = make_profile().to_json()
    edit(data)
    with pytest.raises(ProfileError) as error:
        Profile.load(write(tmp_path, json.dumps(data)))
    return error.value


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no profile at .*nowhere.json"):
        Profile.load(tmp_path / "nowhere.json")


@pytest.mark.parametrize("text", ["", "{", "not json", "\x00\x01", '{"format": "tca-profile/1", "heads": '])
def test_corrupt_json(tmp_path, text):
    with pytest.raises(ProfileError, match="not a valid TCA profile"):
        Profile.load(write(tmp_path, text))


def test_truncated_file(tmp_path):
    path = tmp_path / "profile.json"
    make_profile().save(path)
    full = path.read_text()
    for cut in (1, len(full) // 3, len(full) // 2, len(full) - 2):
        path.write_text(full[:cut])
        with pytest.raises(ProfileError, match="truncated or corrupt"):
            Profile.load(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ProfileError):
        Profile.load(path)


@pytest.mark.parametrize("payload", [[], 3, "x", None, {"format": "tca-profile/0"}, {"no": "format"}])
def test_wrong_format_tag(tmp_path, payload):
    with pytest.raises(ProfileError, match="not a TCA profile") as error:
        Profile.load(write(tmp_path, json.dumps(payload)))
    assert FORMAT in str(error.value)


@pytest.mark.parametrize(
    "missing", ["config", "fingerprint", "heads", "calibration_tokens", "text_sha256", "version"]
)
def test_missing_top_level_key(tmp_path, missing):
    error = damaged(tmp_path, lambda data: data.pop(missing))
    assert missing in str(error)


@pytest.mark.parametrize("missing", ["mu", "sigma", "retained", "kept_tokens", "oracle_tokens"])
def test_missing_head_key(tmp_path, missing):
    error = damaged(tmp_path, lambda data: data["heads"].pop(missing))
    assert missing in str(error)


@pytest.mark.parametrize("missing", ["n_layers", "n_kv_heads"])
def test_missing_fingerprint_key(tmp_path, missing):
    error = damaged(tmp_path, lambda data: data["fingerprint"].pop(missing))
    assert missing in str(error)


@pytest.mark.parametrize("name", ["mu", "sigma", "retained", "kept_tokens", "oracle_tokens"])
def test_wrong_array_shapes(tmp_path, name):
    error = damaged(tmp_path, lambda data: data["heads"][name].pop())
    assert name in str(error) and "(3, 2)" in str(error)
    error = damaged(tmp_path, lambda data: [row.append(0.5) for row in data["heads"][name]])
    assert name in str(error)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("mu", 0.0),
        ("mu", -0.2),
        ("mu", math.nan),
        ("mu", -math.inf),
        ("sigma", 0.0),
        ("sigma", -1.0),
        ("sigma", math.nan),
        ("sigma", math.inf),
        ("retained", math.nan),
        ("kept_tokens", math.inf),
        ("oracle_tokens", -1.0),
    ],
)
def test_bad_head_value_is_named(tmp_path, name, value):
    """A value no calibration produces (the JSON module reads NaN and Infinity) is an error naming
    the field and the head, not a profile that prints garbage or fails later inside tca.apply."""
    error = damaged(tmp_path, lambda data: data["heads"][name][2].__setitem__(1, value))
    assert f"heads.{name}[2][1] is {value}" in str(error) and "calibrate again" in str(error)


def test_nan_retrieval_score_is_named(tmp_path):
    data = make_profile(seed=1).to_json()
    data["heads"]["retrieval"][0][1] = math.nan
    with pytest.raises(ProfileError, match=r"heads.retrieval\[0\]\[1\] is nan"):
        Profile.load(write(tmp_path, json.dumps(data)))


@pytest.mark.parametrize("value", [-4, 2.5, True, None])
def test_bad_calibration_tokens_is_named(tmp_path, value):
    error = damaged(tmp_path, lambda data: data.__setitem__("calibration_tokens", value))
    assert f"calibration_tokens must be an integer >= 0 (0: not calibrated), got {value!r}" in str(error)


@pytest.mark.parametrize(
    "edit",
    [
        lambda data: data["heads"]["mu"][0].__setitem__(1, "big"),
        lambda data: data["heads"].__setitem__("mu", 5),
        lambda data: data["config"].__setitem__("tau", 0),
        lambda data: data["config"].__setitem__("bogus", 1),
        lambda data: data.__setitem__("config", []),
        lambda data: data.__setitem__("calibration_tokens", "many"),
    ],
)
def test_damaged_values(tmp_path, edit):
    damaged(tmp_path, edit)


@pytest.mark.parametrize(
    ("model_config", "fields"),
    [
        (llama_config(num_hidden_layers=4), ["n_layers", "managed_layers"]),
        (llama_config(num_key_value_heads=4), ["n_kv_heads"]),
        (llama_config(num_attention_heads=8), ["n_heads", "head_dim"]),
        (llama_config(head_dim=32), ["head_dim"]),
        (
            Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64),
            ["architecture"],
        ),
        (
            Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=64),
            ["architecture", "n_layers", "n_kv_heads", "managed_layers"],
        ),
        (
            Qwen2Config(
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=64,
                use_sliding_window=True,
                max_window_layers=2,
            ),
            ["architecture", "managed_layers"],
        ),
    ],
)
def test_check_fits_names_the_mismatch(model_config, fields):
    profile = make_profile()
    with pytest.raises(ProfileError) as error:
        profile.check_fits(model_config)
    message = str(error.value)
    actual = model_fingerprint(model_config)
    for field in fields:
        assert f"{field}: profile {profile.fingerprint[field]!r}, model {actual[field]!r}" in message
    untouched = set(actual) - set(fields)
    assert not any(f"{field}:" in message for field in untouched)
    assert "calibrate" in message

    class Wrapper:  # a model: the fingerprint is read from .config
        config = model_config

    with pytest.raises(ProfileError):
        profile.check_fits(Wrapper())


# ---- profiles of models that mix sliding-window and full-attention layers ----------------------------


def gemma3_profile(seed: int = 0) -> Profile:
    """A profile of ``gemma3_config()``: one row per full-attention layer (5, 11, 17)."""
    config = gemma3_config()
    rng = np.random.default_rng(seed)
    shape = (3, 1)
    return Profile(
        config=TCAConfig(block_size=16, local_window=64),
        fingerprint=model_fingerprint(config),
        mu=rng.uniform(0.01, 0.8, shape),
        sigma=rng.choice([0.3, 1.0], shape),
        retained=rng.uniform(0.85, 1, shape),
        kept_tokens=rng.integers(0, 100, shape).astype(float),
        oracle_tokens=rng.integers(0, 100, shape).astype(float),
        calibration_tokens=999,
        text_sha256="cd" * 32,
        version="0.2.0",
        retrieval=rng.uniform(0, 1, shape),
    )


def test_profile_of_managed_layers_round_trip_and_rows(tmp_path):
    profile = gemma3_profile()
    assert profile.managed_layers == (5, 11, 17)
    path = tmp_path / "gemma3.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert_same_profile(profile, loaded)
    assert json.loads(path.read_text())["fingerprint"]["managed_layers"] == [5, 11, 17]
    loaded.check_fits(gemma3_config())
    assert [loaded.row(layer) for layer in (5, 11, 17)] == [0, 1, 2]
    mu, _ = loaded.head_config(11)
    assert mu.tolist() == profile.mu[1].tolist()
    with pytest.raises(ValueError, match=r"layer 4 is not one TCA manages \(managed: \[5, 11, 17\]\)"):
        loaded.head_config(4)
    assert loaded.keep_ratios(4096).shape == (3, 1)


def test_profile_of_managed_layers_checks_its_rows(tmp_path):
    data = gemma3_profile().to_json()
    data["heads"]["mu"].append([0.5])  # a row for every layer is not this profile's shape
    with pytest.raises(ProfileError, match=r"heads.mu has shape \(4, 1\), expected \(3, 1\)"):
        Profile.load(write(tmp_path, json.dumps(data)))


def test_profile_for_another_layer_pattern_names_it():
    pattern = ["sliding_attention"] * 3 + ["full_attention"]  # every fourth layer full, not every sixth
    other = gemma3_config(layer_types=pattern * 4 + ["sliding_attention", "full_attention"])
    with pytest.raises(
        ProfileError, match=r"managed_layers: profile \[5, 11, 17\], model \[3, 7, 11, 15, 17\]"
    ):
        gemma3_profile().check_fits(other)


def test_profile_written_before_managed_layers_means_every_layer(tmp_path):
    data = make_profile().to_json()
    del data["fingerprint"]["managed_layers"]
    loaded = Profile.load(write(tmp_path, json.dumps(data)))
    assert loaded.managed_layers == (0, 1, 2)
    loaded.check_fits(llama_config())
