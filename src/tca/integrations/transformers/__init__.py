"""The transformers integration: attention registration, the compressed cache and its policy,
``tca.apply`` / ``patch``, calibration passes, and which heads this process manages."""

from .calibrate import Calibration, calibrate, measure_calibration, measure_retention, measure_retrieval
from .registration import ContextTooLongError, UnsupportedModelError
from .run import TCARun, apply, patch, unpatch

__all__ = [
    "Calibration",
    "ContextTooLongError",
    "TCARun",
    "UnsupportedModelError",
    "apply",
    "calibrate",
    "measure_calibration",
    "measure_retention",
    "measure_retrieval",
    "patch",
    "unpatch",
]
