"""Int8 decode kernel benchmark: torch's `_weight_int8pack_mm` against fp32 and bf16 `F.linear`, per matrix of a
model shape and per number of rows, and the time to build the int8 copy of the whole model. Prints JSON.

Where service/quantize.py's MAX_ROWS (int8 for calls of at most that many rows) and its "built in the background"
come from:

    python bench/int8_kernel.py                           # SmolLM2-135M's matrices, 1 thread
    python bench/int8_kernel.py --rows 1,4,16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.quantize import Int8DecodeLinear  # noqa: E402


def per_call_us(fn, seconds: float = 0.3) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def matrices(rows: list[int], shapes: list[tuple[int, int]]) -> dict:
    out = {}
    for n_out, n_in in shapes:
        linear = torch.nn.Linear(n_in, n_out, bias=False)
        layer = Int8DecodeLinear(linear.to(torch.bfloat16), max_rows=max(rows))
        w32 = linear.weight.detach().float()
        for m in rows:
            x32 = torch.randn(m, n_in)
            x16 = x32.bfloat16()
            fp32 = per_call_us(lambda: F.linear(x32, w32))  # noqa: B023
            bf16 = per_call_us(lambda: F.linear(x16, layer.weight))  # noqa: B023
            int8 = per_call_us(lambda: layer(x16))  # noqa: B023
            out[f"{m}x{n_out}x{n_in}"] = {
                "fp32_us": round(fp32, 1),
                "bf16_us": round(bf16, 1),
                "int8_us": round(int8, 1),
                "int8_vs_bf16": round(bf16 / int8, 2),
            }
    return out


def build_seconds(shape: str) -> dict:
    from bench.shapes import build_shape
    from service.quantize import int8_decode_copy

    model, _ = build_shape(shape)
    model = model.to(torch.bfloat16)
    t0 = time.perf_counter()
    _, replaced = int8_decode_copy(model)
    return {"shape": shape, "layers": replaced, "seconds": round(time.perf_counter() - t0, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,6,8,12,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", default="smollm2-135m", help="bench/shapes.py shape for the whole-model build time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(x) for x in args.rows.split(",")]
    shapes = [(1536, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: MLP up/gate, MLP down, output head
    print(
        json.dumps(
            {
                "threads": args.threads,
                "torch": torch.__version__,
                "matrices": matrices(rows, shapes),
                "int8_copy_build": build_seconds(args.shape),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
