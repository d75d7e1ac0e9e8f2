"""Test-session setup: without a GPU, Triton kernels run under the Triton interpreter.

The variable must be set before anything imports Triton (transformers and torch do, and Triton
reads it once), so it is set here, before torch is imported, from the absence of an NVIDIA device.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
