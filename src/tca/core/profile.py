"""Profile: the calibrated budget configuration of every (layer, KV head), saved as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .budgets import nominal_kept
from .config import TCAConfig

FORMAT = "tca-profile/1"


def _version() -> str:
    from .. import __version__

    return __version__


class ProfileError(ValueError):
    """A profile file that cannot be read, or a profile that does not fit a model."""


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def text_config(model: Any) -> Any:
    """The decoder config of ``model`` (or of a config): the text part of a multimodal one."""
    config = getattr(model, "config", model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_types(model: Any) -> list[str]:
    """Each layer's attention, ``"full_attention"`` or ``"sliding_attention"``, from the config.

    The config's ``layer_types`` when it has them (Gemma 3: five sliding layers, then one full;
    Qwen2/3: full unless ``use_sliding_window``); otherwise every layer is sliding when the config
    sets ``sliding_window`` (Mistral) and full when it does not (Llama). Other kinds of layer
    (chunked, linear attention, ...) are returned as named, for the caller to refuse.
    """
    config = text_config(model)
    declared = getattr(config, "layer_types", None)
    if declared is not None:
        return list(declared)
    sliding = getattr(config, "sliding_window", None) is not None
    return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * config.num_hidden_layers


def full_attention_layers(model: Any) -> list[int]:
    """The layers that attend to the whole context: the ones TCA manages."""
    return [layer for layer, kind in enumerate(layer_types(model)) if kind == FULL_ATTENTION]


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What a profile must match: architecture and attention shapes of ``model`` (or its config),
    and ``managed_layers``, the full-attention layers TCA selects for (all of them but on models
    that mix sliding-window and full layers)."""
    config = text_config(model)
    n_heads = config.num_attention_heads
    return {
        "architecture": config.model_type,
        "n_layers": config.num_hidden_layers,
        "n_heads": n_heads,
        "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        "managed_layers": full_attention_layers(config),
    }


@dataclass
class Profile:
    """Budgets per (managed layer, KV head) and how they were obtained.

    A profile holds the layers TCA manages only: every array has one row per entry of
    ``managed_layers`` (``fingerprint["managed_layers"]``), in that order, so row ``i`` is layer
    ``managed_layers[i]`` (``row(layer)`` maps back). For most families that is every layer; on a
    model that mixes sliding-window and full-attention layers (Gemma 3) it is the full ones, and the
    sliding layers, which keep their own window attention and cache, have no row. A fingerprint
    without ``managed_layers`` (profiles written before it existed) means every layer.

    ``mu``/``sigma`` (n_managed_layers, n_kv_heads) are each head's log-Gaussian configuration
    (``mu = inf``: the head keeps everything). ``retained`` is the chosen configuration's
    retained attention mass on the calibration text, ``kept_tokens`` its global tokens there,
    ``oracle_tokens`` the fewest global tokens any selection could keep at tau. ``retrieval``
    (None in profiles made without it) is each head's retrieval score (``tca.retrieval``).
    """

    config: TCAConfig
    fingerprint: dict[str, Any]
    mu: np.ndarray
    sigma: np.ndarray
    retained: np.ndarray
    kept_tokens: np.ndarray
    oracle_tokens: np.ndarray
    calibration_tokens: int
    text_sha256: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)
    retrieval: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.fingerprint = dict(self.fingerprint)
        managed = self.fingerprint.get("managed_layers", range(int(self.fingerprint.get("n_layers", 0))))
        self.fingerprint["managed_layers"] = [int(layer) for layer in managed]

    @property
    def managed_layers(self) -> tuple[int, ...]:
        """The model layers the profile's rows stand for, ascending."""
        return tuple(self.fingerprint["managed_layers"])

    def row(self, layer: int) -> int:
        """The row of model layer ``layer`` in the arrays (ValueError: a layer it does not manage)."""
        try:
            return self.managed_layers.index(layer)
        except ValueError:
            raise ValueError(
                f"layer {layer} is not one TCA manages (managed: {list(self.managed_layers)}); "
                "sliding-window layers keep their own attention."
            ) from None

    @classmethod
    def uniform(cls, model: Any, config: TCAConfig, mu: float, sigma: float = 1.0) -> Profile:
        """Every (layer, KV head) with the same configuration, uncalibrated: for speed benchmarks
        (see ``budgets.mu_for_share`` for the ``mu`` of a target kept share) and tests."""
        fingerprint = model_fingerprint(model)
        shape = (len(fingerprint["managed_layers"]), fingerprint["n_kv_heads"])
        zeros = np.zeros(shape)
        return cls(
            config=config,
            fingerprint=fingerprint,
            mu=np.full(shape, mu),
            sigma=np.full(shape, sigma),
            retained=zeros,
            kept_tokens=zeros,
            oracle_tokens=zeros,
            calibration_tokens=0,
            text_sha256="",
            version=_version(),
            extra={"uniform": True},
        )

    def head_config(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of model layer ``layer``'s KV heads, each (n_kv_heads,) float64."""
        row = self.row(layer)
        return torch.from_numpy(self.mu[row].copy()), torch.from_numpy(self.sigma[row].copy())

    def keep_ratios(self, context_len: int) -> np.ndarray:
        """Nominal fraction of KV entries kept at ``context_len``, window included.

        Returns (n_managed_layers, n_kv_heads) floats in (0, 1], rows as ``managed_layers``.
        """
        window = min(self.config.effective_window, context_len)
        kept = nominal_kept(
            torch.from_numpy(self.mu),
            torch.from_numpy(self.sigma),
            context_len - window,
            self.config.block_size,
        )
        return (kept.numpy() + window) / context_len

    def check_fits(self, model: Any) -> None:
        """Raise ProfileError naming every fingerprint field where ``model`` differs."""
        actual = model_fingerprint(model)
        wrong = [
            f"{k}: profile {self.fingerprint.get(k)!r}, model {v!r}"
            for k, v in actual.items()
            if self.fingerprint.get(k) != v
        ]
        if wrong:
            raise ProfileError(
                "this profile was calibrated for another model (" + "; ".join(wrong) + "). "
                "Run tca.calibrate(model, tokenizer) for this model."
            )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (dense heads have ``mu: null``)."""
        mu = [[None if math.isinf(m) else float(m) for m in row] for row in self.mu]
        return {
            "format": FORMAT,
            "version": self.version,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "calibration_tokens": self.calibration_tokens,
            "text_sha256": self.text_sha256,
            "heads": {
                "mu": mu,
                "sigma": self.sigma.tolist(),
                "retained": self.retained.tolist(),
                "kept_tokens": self.kept_tokens.tolist(),
                "oracle_tokens": self.oracle_tokens.tolist(),
                "retrieval": None if self.retrieval is None else self.retrieval.tolist(),
            },
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (atomically: a crash never leaves half a file, and a failed
        write, e.g. to a directory's path, leaves no temporary file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1))
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile saved by ``save``; a corrupt, truncated or foreign file is a ProfileError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no profile at {path}; create one with `tca calibrate`.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ProfileError(
                f"{path} is not a valid TCA profile ({error}); it may be truncated or "
                "corrupt: calibrate again with `tca calibrate`."
            ) from None
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "profile") -> Profile:
        """Build from the dict of ``to_json``, checking every field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ProfileError(f"{source} is not a TCA profile (format {found!r}, expected {FORMAT!r}).")
        try:
            config = TCAConfig.from_dict(data["config"])
            fingerprint = dict(data["fingerprint"])
            heads = data["heads"]
            managed = fingerprint.get("managed_layers", range(int(fingerprint["n_layers"])))
            shape = (len(managed), int(fingerprint["n_kv_heads"]))
            mu = np.array(
                [[math.inf if m is None else m for m in row] for row in heads["mu"]], dtype=np.float64
            )
            arrays = {
                name: np.array(heads[name], dtype=np.float64)
                for name in ("sigma", "retained", "kept_tokens", "oracle_tokens")
            }
            profile = cls(
                config=config,
                fingerprint=fingerprint,
                mu=mu,
                sigma=arrays["sigma"],
                retained=arrays["retained"],
                kept_tokens=arrays["kept_tokens"],
                oracle_tokens=arrays["oracle_tokens"],
                calibration_tokens=_calibration_tokens(data["calibration_tokens"], source),
                text_sha256=str(data["text_sha256"]),
                version=str(data["version"]),
                extra=dict(data.get("extra", {})),
                retrieval=None if heads.get("retrieval") is None else np.array(heads["retrieval"], float),
            )
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ProfileError(
                f"{source} is a damaged TCA profile ({type(error).__name__}: {error}); "
                "calibrate again with `tca calibrate`."
            ) from None
        for name in ("mu", "sigma", "retained", "kept_tokens", "oracle_tokens", "retrieval"):
            array = getattr(profile, name)
            if array is not None and array.shape != shape:
                raise ProfileError(
                    f"{source}: heads.{name} has shape {array.shape}, expected {shape} "
                    "(managed layers, n_kv_heads); the file is damaged: calibrate again."
                )
        _check_values(profile, source)
        return profile


# per head array: (what a valid entry is, the test) -- NaN fails every test
_HEAD_RULES = {
    "mu": ("> 0 (null for a dense head)", lambda a: a > 0),
    "sigma": ("finite and > 0", lambda a: np.isfinite(a) & (a > 0)),
    "retained": ("finite and >= 0", lambda a: np.isfinite(a) & (a >= 0)),
    "kept_tokens": ("finite and >= 0", lambda a: np.isfinite(a) & (a >= 0)),
    "oracle_tokens": ("finite and >= 0", lambda a: np.isfinite(a) & (a >= 0)),
    "retrieval": ("finite", np.isfinite),
}


def _check_values(profile: Profile, source: str) -> None:
    """Raise ProfileError naming the first head entry that no calibration can produce."""
    for name, (rule, valid) in _HEAD_RULES.items():
        array = getattr(profile, name)
        if array is None:
            continue
        bad = np.argwhere(~valid(array))
        if len(bad):
            layer, head = (int(i) for i in bad[0])
            raise ProfileError(
                f"{source}: heads.{name}[{layer}][{head}] is {float(array[layer, head])}; {name} must be "
                f"{rule} ({len(bad)} bad entries). The file is damaged: calibrate again."
            )


def _calibration_tokens(value: Any, source: str) -> int:
    """The calibration length: a JSON integer >= 0 (0: an uncalibrated profile, ``Profile.uniform``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProfileError(
            f"{source}: calibration_tokens must be an integer >= 0 (0: not calibrated), got {value!r}; "
            "the file is damaged: calibrate again."
        )
    return value
