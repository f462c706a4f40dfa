"""SwiGLU's activation over a fused gate/up product: silu(gate) · up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2·n] → [..., n]. A bfloat16 product on the CPU (the prefill of packed layers) takes one
    C++ pass in float32 with one rounding; everything else the torch ops."""
    if gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu" and kernels.quant_kernels_available():
        rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        isa = kernels.ISA_NAMES.index(kernels.best_isa())
        return torch.ops.pagedllm_quant.silu_and_mul(rows, isa).view(*gate_up.shape[:-1], -1)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
