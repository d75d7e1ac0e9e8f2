"""Gemma 3 270M shapes on a GPU: the sliding layers' prefill through the window kernel against
transformers' masked SDPA, for accuracy and speed.

    python benchmarks/probes/sliding_window_check.py [length ...]     # one GPU, about a minute

Random bf16 weights (``benchmarks/e2e.py``'s model), the bundled profile, a left-padded batch of 2
(the second row 1,000 tokens shorter). Per length: the last-position logits of a TCA prefill with
the sliding layers on the window kernel (``sliding.DEVICES`` = cuda, the default) and on SDPA
(``DEVICES`` empty), their largest difference relative to the logits' scale and whether the greedy
token agrees; then each way's prefill time (median of 5, CUDA-synchronised).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import e2e  # noqa: E402

import tca  # noqa: E402
from tca.bundled.profiles import profile_for  # noqa: E402
from tca.integrations.transformers import sliding  # noqa: E402


def prefill(model, ids, mask, profile) -> tuple[torch.Tensor, float]:
    """(last-position logits (B, vocab), median ms of 5) of a TCA prefill."""
    times = []
    for _ in range(6):
        e2e.sync()
        start = time.perf_counter()
        with torch.no_grad(), tca.apply(model, profile):
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
        e2e.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return logits, statistics.median(times[1:])


def main(lengths: list[int]) -> None:
    model = e2e.random_model(e2e.model_config("gemma3-270m", max(lengths) + 600), "cuda")
    profile = profile_for("gemma3-270m")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Gemma 3 270M shapes, random bf16")
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        ids = torch.randint(3, 100000, (2, length), generator=generator).cuda()
        mask = torch.ones_like(ids)
        mask[1, :1000] = 0  # the second row left-padded by 1,000 tokens
        ids[1, :1000] = 0
        kernel, kernel_ms = prefill(model, ids, mask, profile)
        sliding.DEVICES = ()
        sdpa, sdpa_ms = prefill(model, ids, mask, profile)
        sliding.DEVICES = ("cuda",)
        error = ((kernel - sdpa).abs().max() / sdpa.abs().max()).item()
        agree = torch.equal(kernel.argmax(-1), sdpa.argmax(-1))
        print(
            f"L {length}: prefill {kernel_ms:.1f} ms (window kernel) against {sdpa_ms:.1f} ms (masked SDPA); "
            f"last-position logits differ by {error:.2e} of their scale; greedy tokens agree: {agree}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [8192, 32768])
