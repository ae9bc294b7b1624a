"""Weight-only int8 for decode steps on CPU (`ALIGND_QUANTIZE=int8`): what makes one request at a time faster.

Decoding one sequence multiplies a single row of activations by every weight matrix: the time goes into reading the
weights, and neither bf16 nor fp32 matmuls of one row run near the memory's speed on these CPUs. torch's own
`_weight_int8pack_mm` CPU kernel reads int8 weights with a per-output-channel scale directly: for one row 2.1-3.2x
faster than bf16 at SmolLM2-135M's matrices, output head included; for a batch of rows it is slower (8 rows 0.7-1.0x,
16 rows 0.35-0.5x; `python bench/int8_kernel.py`). So each quantized layer keeps its original weight too and uses
the int8 kernel only for calls of at most `max_rows` rows: a single stream's decode steps (and a small batch's) go
int8, prefill and the batched decode of many clients keep the serving dtype's weights and outputs bit for bit.

Written here rather than with torchao: torchao's `Int8WeightOnlyConfig` runs, in eager mode, a matmul against the
whole weight converted back to the activation dtype on every call (int8_tensor.py: `w_vals_int8_t.to(output_dtype)`),
which is slower than not quantizing unless `torch.compile` fuses it — and compiling measured 0.6x here
(README). And torchao would replace the weights themselves, where serving needs the model untouched: the copy made
here shares every tensor with it (a base cache merges later adapters into the original, training/lora.py).

The kernel crashes the process (not an error) when the inner dimension is not a multiple of 8 (torch 2.13, measured):
such layers are left as they are, as are GPT-2's Conv1D layers (only `nn.Linear` is replaced).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4  # rows per call up to which the kernel beats bf16 (bench/int8_kernel.py: 4 rows 1.3-1.6x, 6 ~1x)
K_MULTIPLE = 32  # inner dimensions the kernel handles (it needs multiples of 8; real models use multiples of 64)


class Int8DecodeLinear(nn.Module):
    """An `nn.Linear` that multiplies calls of at most `max_rows` rows by an int8 copy of its weight (symmetric,
    one scale per output channel, computed in float32) and larger ones by the original weight, which it shares."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.weight, self.bias = linear.weight, linear.bias  # shared, never written
        with torch.no_grad():  # in place on one float32 copy: ~3x faster than out-of-place (0.6 s at 135 M)
            w = linear.weight.detach().to(torch.float32, copy=True)  # never .float(): a no-op on float32 weights
            lo, hi = torch.aminmax(w, dim=1)
            # the kernel takes bf16 scales: round them first, so the int8 values are chosen for the scales used
            scales = (torch.maximum(-lo, hi).clamp_(min=1e-12) / 127.0).to(torch.bfloat16)
            q = w.div_(scales.float()[:, None]).round_().clamp_(-127, 127)
            self.register_buffer("qweight", q.to(torch.int8))
            self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or rows == 0:
            return F.linear(x, self.weight, self.bias)
        # the kernel's fast path takes bf16 activations (fp32 ones run 4x slower than the fp32 matmul)
        a = x.reshape(rows, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(a, self.qweight, self.scales.to(torch.bfloat16))  # (a module .to() casts it)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 up to {self.max_rows} rows"


def quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.device.type == "cpu" and module.in_features % K_MULTIPLE == 0


def int8_decode_copy(model: nn.Module, max_rows: int = MAX_ROWS) -> tuple[nn.Module, int]:
    """(a copy of `model` whose quantizable linear layers are `Int8DecodeLinear`, how many were replaced). The copy
    shares every parameter and buffer with `model` (only the module objects are new), so `model` is unchanged."""
    memo: dict[int, object] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fast = copy.deepcopy(model, memo)
    targets = [name for name, module in fast.named_modules() if quantizable(module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = fast.get_submodule(parent_name) if parent_name else fast
        setattr(parent, child, Int8DecodeLinear(getattr(parent, child), max_rows))
    return fast.eval(), len(targets)
