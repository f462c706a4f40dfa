"""MLP activations: the gated kinds over a fused gate/up product (SwiGLU's silu(gate) · up,
GeGLU's gelu(gate) · up, gpt-oss's clamped SwiGLU), and the plain ones for an ungated MLP."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from ..config import ModelConfig


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2·n] → [..., n]. A bfloat16 product on the CPU (the prefill of packed layers) takes one
    C++ pass in float32 with one rounding; everything else, and anything a backward pass goes through
    (training), the torch ops."""
    if gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu" and not gate_up.requires_grad \
            and kernels.quant_kernels_available():
        rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        isa = kernels.best_isa_id()
        return torch.ops.pagedllm_quant.silu_and_mul(rows, isa).view(*gate_up.shape[:-1], -1)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu_tanh": gelu_tanh, "gelu": F.gelu}


def clamped_swiglu(alpha: float, limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """gpt-oss's SwiGLU (llama.cpp's swiglu_oai): the gate clamped above at `limit`, up to ±limit, then
    (up + 1) · gate · sigmoid(alpha · gate); computed in float32."""

    def swiglu_oai(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.float().chunk(2, dim=-1)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return ((up + 1) * gate * torch.sigmoid(alpha * gate)).to(gate_up.dtype)

    return swiglu_oai


def gated(cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated activation over [..., 2·n] gate/up products for the model's activation."""
    kind = cfg.hidden_act
    if kind == "silu":
        return silu_and_mul
    if kind == "swiglu_oai":
        return clamped_swiglu(cfg.swiglu_alpha, cfg.swiglu_limit)
    activation = ACTIVATIONS[kind]

    def act_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return activation(gate) * up

    return act_and_mul
