"""Peak memory of calibration at two lengths: it must grow about linearly in L, not as L^2.

Samples the process's resident memory every 10 ms while ``tca.calibrate`` runs on SmolLM2 (CPU)
and reports the peak above the resident memory before it started, next to the size an L x L
attention matrix of one layer (all query heads, float32) would have.

    python benchmarks/calibration_memory.py --out benchmarks/results/calibration-memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import torch

from tca.bundled import texts
from tca.bundled.models import load_model
from tca.core.config import TCAConfig
from tca.eval.provenance import provenance
from tca.integrations.transformers import calibrate


def peak_rss_during(work) -> tuple[int, float]:
    """(peak resident bytes above the start, seconds) while ``work()`` runs."""
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    began = time.perf_counter()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return peak[0] - start, time.perf_counter() - began


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    model, tokenizer = load_model("smollm2")
    config = TCAConfig.for_model(model)
    text = texts.calibration_text()
    heads = model.config.num_attention_heads
    # warm-up: the first forward of a process allocates buffers that later ones reuse
    calibrate(model, tokenizer, text, config, max_tokens=1024, progress=False)
    rows = []
    for length in args.lengths:
        peak, seconds = peak_rss_during(
            lambda n=length: calibrate(model, tokenizer, text, config, max_tokens=n, progress=False)
        )
        rows.append(
            {
                "tokens": length,
                "peak_bytes_above_start": peak,
                "seconds": seconds,
                "one_layer_LxL_fp32_bytes": heads * length * length * 4,
                "query_chunk": config.query_chunk,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    resolved = {"args": vars(args), "tca": config.to_dict()}
    out = {**provenance("cpu", config=resolved), "model": "SmolLM2-135M-Instruct", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
