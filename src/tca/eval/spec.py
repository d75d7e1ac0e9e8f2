"""What ``tca eval`` runs: the settings, tasks, lengths and samples (no torch import: the CLI
reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import TCAConfig
from .tasks import TASKS

PERPLEXITY = "perplexity"
BASELINES = (  # tca.methods.METHODS (a test keeps the two equal)
    "full",
    "streaming",
    "snapkv",
    "vertical_slash",
    "flexprefill",
    "xattention",
    "random",
    "topk_last",
)
ALL_METHODS = ("tca", *BASELINES)
CALIBRATIONS = ("prose", "docs", "code")  # bundled text kinds TCA can be calibrated on
TCA_OPTIONS = (  # TCAConfig fields a tca setting may change (tau is its own; query_chunk changes no result)
    "alpha",
    "block_size",
    "candidates",
    "local_window",
    "observation_queries",
    "observation_max",
    "continuation",
    "pool_kernel",
    "retrieval_threshold",
)
Option = tuple[str, int | float | None]


def _option_value(text: str) -> int | float | None:
    """``off`` -> None, ``256`` -> 256, ``0.03`` -> 0.03; ValueError otherwise."""
    if text == "off":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _option_text(value: int | float | None) -> str:
    return "off" if value is None else f"{value:g}"


@dataclass(frozen=True)
class Setting:
    """One attention configuration: ``method`` with a ``kept_fraction`` (baselines) or ``tau`` (tca).

    ``options``: TCAConfig fields a tca setting changes from the model's defaults (``TCA_OPTIONS``),
    sorted by name, e.g. ``(("local_window", 256), ("retrieval_threshold", None))``.
    """

    method: str
    kept_fraction: float | None = None
    tau: float | None = None
    options: tuple[Option, ...] = ()

    @property
    def key(self) -> str:
        """A short unique name: ``full``, ``tca@tau0.9`` (``tca@tau0.9,local_window=256`` with
        options) or ``snapkv@0.3``."""
        if self.method == "full":
            return "full"
        if self.method == "tca":
            return f"tca@tau{self.tau:g}" + "".join(f",{n}={_option_text(v)}" for n, v in self.options)
        return f"{self.method}@{self.kept_fraction:g}"

    @classmethod
    def parse(cls, key: str) -> Setting:
        """The setting named by ``key`` (``full``, ``tca@tau0.9``, ``tca@tau0.9,NAME=VALUE,...``,
        ``snapkv@0.3``); ValueError otherwise. Option values are numbers, or ``off`` for None."""
        method, _, value = key.partition("@")
        if method == "full" and not value:
            return cls("full")
        if method == "tca" and value.startswith("tau"):
            return cls._parse_tca(key, value[3:])
        if method in BASELINES and method != "full" and value:
            try:
                return cls(method, kept_fraction=float(value))
            except ValueError:
                pass
        raise _not_a_setting(key)

    @classmethod
    def _parse_tca(cls, key: str, text: str) -> Setting:
        """``tca@tau`` + ``text`` (``0.9`` or ``0.9,NAME=VALUE,...``)."""
        tau, *pairs = text.split(",")
        try:
            options = dict(pair.split("=") for pair in pairs)
        except ValueError:  # a pair is not NAME=VALUE
            raise _not_a_setting(key) from None
        unknown = sorted(set(options) - set(TCA_OPTIONS))
        if unknown:
            raise ValueError(
                f"setting {key!r}: unknown option {', '.join(unknown)}; choose from {', '.join(TCA_OPTIONS)}."
            )
        if len(options) != len(pairs):
            raise ValueError(f"setting {key!r}: an option is given twice.")
        try:
            values = tuple(sorted((name, _option_value(raw)) for name, raw in options.items()))
            return cls("tca", tau=float(tau), options=values)
        except ValueError:
            raise _not_a_setting(key) from None


def _not_a_setting(key: str) -> ValueError:
    return ValueError(
        f"setting {key!r} is not 'full', 'tca@tauT[,NAME=VALUE...]' or 'METHOD@FRACTION' with "
        f"METHOD one of {', '.join(BASELINES[1:])}."
    )


@dataclass
class EvalSpec:
    """What to run. ``calibration``: which bundled text kind calibrates TCA (prose, docs, code)."""

    methods: list[str] = field(default_factory=lambda: ["full", "tca", "snapkv", "streaming"])
    tasks: list[str] = field(default_factory=lambda: [*TASKS, PERPLEXITY])
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    samples: int = 5
    kept_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    taus: list[float] = field(default_factory=lambda: [0.9])
    seed: int = 0
    batch_size: int = 8
    batch_tokens: int | None = None  # also cap a batch at this many prompt tokens (None: no cap)
    calibration: str = "prose"
    calibration_tokens: int = 4096  # TCA calibrates on this many tokens of the calibration text
    only: list[str] | None = None  # setting keys to run instead of methods x taus x kept fractions

    def check(self) -> None:
        """ValueError naming the first unknown method, task, calibration kind or bad number."""
        for name in self.methods:
            if name not in ALL_METHODS:
                raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}.")
        for task in self.tasks:
            if task not in (*TASKS, PERPLEXITY):
                raise ValueError(f"unknown task {task!r}; choose from {', '.join((*TASKS, PERPLEXITY))}.")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"unknown calibration {self.calibration!r}; choose from {', '.join(CALIBRATIONS)}."
            )
        chosen = [Setting.parse(key) for key in self.only or []]
        for tau in [*self.taus, *(s.tau for s in chosen if s.tau is not None)]:
            if not 0 < tau <= 1:
                raise ValueError(f"tau must be in (0, 1], got {tau!r}.")
        for setting in chosen:
            try:
                TCAConfig(**dict(setting.options))  # each option's own range
            except (TypeError, ValueError) as error:
                raise ValueError(f"setting {setting.key!r}: {error}") from None
        for fraction in [
            *self.kept_fractions,
            *(s.kept_fraction for s in chosen if s.kept_fraction is not None),
        ]:
            if not 0 < fraction <= 1:
                raise ValueError(f"kept fractions must be in (0, 1], got {fraction!r}.")
        if (
            self.samples < 1
            or self.batch_size < 1
            or self.calibration_tokens < 1
            or any(n < 1 for n in self.lengths)
        ):
            raise ValueError("samples, batch size, calibration tokens and lengths must be >= 1.")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch tokens must be >= 1, got {self.batch_tokens!r}.")

    def batch_for(self, length: int) -> int:
        """Samples per batch at ``length``: ``batch_size``, capped by ``batch_tokens`` (at least 1)."""
        if self.batch_tokens is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.batch_tokens // length))

    def settings(self) -> list[Setting]:
        """Every setting, in a fixed order: full, tca from the highest tau, then each baseline by kept
        fraction; or the settings of ``only``, in its order."""
        if self.only is not None:
            return list(dict.fromkeys(Setting.parse(key) for key in self.only))
        out = [Setting("full")] if "full" in self.methods else []
        if "tca" in self.methods:
            out += [Setting("tca", tau=tau) for tau in sorted(self.taus, reverse=True)]
        for name in self.methods:
            if name not in ("full", "tca"):
                out += [Setting(name, kept_fraction=f) for f in sorted(self.kept_fractions)]
        return out
