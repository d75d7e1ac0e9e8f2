"""tca-attention: Training-free Context-adaptive Attention for Hugging Face causal LMs."""

from .config import TCAConfig
from .profile import Profile, ProfileError

__version__ = "0.1.0"

__all__ = ["TCAConfig", "Profile", "ProfileError", "__version__"]
