"""tca-attention: Training-free Context-adaptive Attention for Hugging Face causal LMs.

model, tokenizer = tca.load_model("smollm2")
profile = tca.calibrate(model, tokenizer)
with tca.apply(model, profile) as run:
    model.generate(...)
"""

__version__ = "0.1.0"

from .calibrate import calibrate  # noqa: E402
from .config import TCAConfig  # noqa: E402
from .hf import ContextTooLongError, UnsupportedModelError, apply  # noqa: E402
from .models import load_model  # noqa: E402
from .profile import Profile, ProfileError  # noqa: E402

__all__ = [
    "ContextTooLongError",
    "Profile",
    "ProfileError",
    "TCAConfig",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "calibrate",
    "load_model",
]
