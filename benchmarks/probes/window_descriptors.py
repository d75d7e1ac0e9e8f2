"""The sparse prefill's window keys read through Hopper's tensor memory accelerator (TMA), or not.

    python benchmarks/probes/window_descriptors.py [--length N]

One GPU, about 3 minutes at 131072 tokens. The window keys ``[max(p0 - w + 1, start), p_last]``
are the one contiguous run of keys a prefill program reads (the kept keys are gathered row by row,
which Hopper's TMA cannot do), so only there can descriptor loads replace pointer loads. Since
they proved faster, the library reads the window through host tensor descriptors where the GPU has
TMA (``launchers.WINDOW_TMA``: K and V seen as 2-D matrices of rows, blocks of (keys per tile, d));
this probe times both ways with ``prefill_variants.py``'s harness:
alone, and in the prefill of a model with one GPU's widths and with a TP=2 rank's, taking turns.

Log: ``results/window-descriptors-nvidia-h200.log``. Its run 1 timed the first version, a variant
kernel written in this probe (device-side descriptors, one per program) against the library's kernel
of then, with and without ``warp_specialize`` on the unmasked window loop (``git show 8ce8607:
benchmarks/probes/window_descriptors.py``); run 2, the library's first host version (4-D
descriptors over (B, G, L, d), each tile reshaped to 2-D), at 62b61fb.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import prefill_variants  # noqa: E402

from tca.ops.triton import launchers  # noqa: E402

ADDRESSES = "window through addresses"


def main(length: int) -> None:
    """Both ways alone at both head counts, then both in the two models' prefills."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    prefill_variants.VARIANTS.pop("4 stages")  # timed before: no gain
    prefill_variants.VARIANTS[ADDRESSES] = {"WINDOW_TMA": False}
    prefill_variants.BASE["WINDOW_TMA"] = launchers.WINDOW_TMA
    prefill_variants.alone(length)
    variants = [prefill_variants.DEFAULT, ADDRESSES]
    prefill_variants.in_model(length, variants, "one GPU (32/8 heads)")
    rank = dict(num_attention_heads=16, num_key_value_heads=4, intermediate_size=7168, head_dim=128)
    prefill_variants.in_model(length, variants, "a TP=2 rank's widths (16/4 heads)", **rank)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    main(parser.parse_args().length)
