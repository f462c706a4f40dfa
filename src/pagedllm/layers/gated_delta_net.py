"""Gated DeltaNet (Qwen3.5, Qwen3-Next): linear attention whose state per sequence is a matrix per value
head, updated by the gated delta rule, after a short causal convolution over q, k and v.

Per token: S ← S·e^g, then S ← S + k ⊗ β(v − Sᵀk), and the output is Sᵀq (q, k l2-normalised, q
scaled by 1/√dk; β = sigmoid(b), g = −e^A · softplus(a + dt_bias) ≤ 0). Decode steps take that step
for every sequence at once; prefill chunks take the chunked form (chunks of 64 tokens: the steps
within a chunk folded into matrix products through a unit-triangular solve), as transformers'
torch_chunk_gated_delta_rule and flash-linear-attention compute it. The output is RMS-normalised per
value head and gated by silu(z).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..distributed import RankRows, delta_net_heads
from .linear import LinearPlan
from .norm import RMSNorm
from .recurrent_state import StateMetadata, causal_conv

CHUNK = 64  # tokens a chunk of the chunked form folds together


class GatedDeltaNet(nn.Module):
    """Under tensor parallelism each rank holds whole key heads and the value heads that read them: its
    rows of q, k, v, z, b and a, its convolution channels, decays and recurrent states, and the matching
    input columns of out_proj (whose partial products the ranks sum)."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str):
        super().__init__()
        key_heads, value_heads = delta_net_heads(cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                                                 cfg.linear_value_heads_tiled, plan.tp)
        self.key_heads, self.value_heads = key_heads.count, value_heads.count  # this rank's
        self.key_dim, self.value_dim = dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.tiled = cfg.linear_value_heads_tiled
        keys, values = self.key_heads * dk, self.value_heads * dv
        self.splits = [keys, keys, values, values, self.value_heads, self.value_heads]  # q k v z b a
        key_rows, value_rows = key_heads.scaled(dk), value_heads.scaled(dv)
        conv_rows = RankRows.concat(key_rows, key_rows, value_rows)
        self.in_proj = plan.linear(prefix, {"in_proj_qkv": 2 * keys + values, "in_proj_z": values,
                                            "in_proj_b": self.value_heads, "in_proj_a": self.value_heads},
                                   cfg.hidden_size, parallel="column",
                                   rank_slices=(conv_rows, value_rows, value_heads, value_heads))
        conv = 2 * keys + values
        self.conv1d = nn.Conv1d(conv, conv, cfg.conv_kernel, groups=conv, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.value_heads))
        self.A_log = nn.Parameter(torch.empty(self.value_heads))
        if plan.tp is not None and plan.tp.size > 1:
            self.conv1d.weight.rank_rows = conv_rows  # read by the loader (models/transformer.py: _copy_param)
            self.dt_bias.rank_rows = self.A_log.rank_rows = value_heads
        self.norm = RMSNorm(dv, cfg.rms_norm_eps)  # plain w, not the model's (1 + w); shared by the heads
        self.out_proj = plan.linear(prefix, {"out_proj": cfg.hidden_size}, values, parallel="row",
                                    rank_slices=(value_rows,))

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor], meta: StateMetadata) -> torch.Tensor:
        """x [tokens, hidden] of the step's sequences (meta's order); states: the convolution's last inputs
        [slots, taps − 1, conv channels] and the recurrent matrices [slots, value heads, dk, dv]."""
        conv_state, matrices = states
        if meta.decoding and _decode_kernel_runs(x, matrices):
            return self.out_proj(self._decode_step(x, conv_state, matrices, meta).to(x.dtype))
        proj = self.in_proj(x)
        z, b, a = proj[:, sum(self.splits[:3]):].split(self.splits[3:], dim=-1)
        mixed = causal_conv(proj[:, :sum(self.splits[:3])], self.conv1d.weight[:, 0], None, conv_state, meta, silu=True)
        q, k, v = mixed.float().split(self.splits[:3], dim=-1)
        tokens = len(x)
        q = self._per_value_head(_l2_normalised(q.view(tokens, self.key_heads, -1))) * self.key_dim**-0.5
        k = self._per_value_head(_l2_normalised(k.view(tokens, self.key_heads, -1)))
        beta = torch.sigmoid(b.float())
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        out = gated_delta_rule(q, k, v.view(tokens, self.value_heads, -1), g, beta, matrices, meta)
        out = self.norm(out.to(x.dtype)) * F.silu(z.view(tokens, self.value_heads, -1).float()).to(x.dtype)
        return self.out_proj(out.reshape(tokens, -1))


    def _decode_step(self, x: torch.Tensor, conv_state: torch.Tensor, matrices: torch.Tensor,
                     meta: StateMetadata) -> torch.Tensor:
        """Every sequence decoding one token: the C++ step (kernels/recurrent_layers.cpp), the same arithmetic."""
        proj = self.in_proj(x).float().contiguous()
        taps = self.conv1d.weight.shape[-1]
        return kernels.delta_net_decode(proj, self.conv1d.weight.float().reshape(-1, taps), self.A_log.float(),
                                        self.dt_bias.float(), self.norm.weight.float(), self.norm.eps, conv_state,
                                        matrices, meta.slots, meta.fresh, self.key_heads, self.tiled)

    def _per_value_head(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, key heads, dk] → [tokens, value heads, dk]: value head h reads key head h // repeat
        (grouped, as Hugging Face checkpoints order them) or h mod key heads (tiled, llama.cpp's files)."""
        repeat = self.value_heads // self.key_heads
        return x.repeat(1, repeat, 1) if self.tiled else x.repeat_interleave(repeat, 1)


def _decode_kernel_runs(x: torch.Tensor, matrices: torch.Tensor) -> bool:
    return x.device.type == "cpu" and matrices.dtype == torch.float32 and kernels.quant_kernels_available()


def _l2_normalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     matrices: torch.Tensor, meta: StateMetadata) -> torch.Tensor:
    """Outputs [tokens, heads, dv] (float32) of each sequence's tokens (q, k [tokens, heads, dk]; v; g and
    beta [tokens, heads]), continuing from its matrix [heads, dk, dv] in `matrices`, written back after.
    Sequences decoding one token take the recurrent step together, the others the chunked form together
    (padded to the longest of them only)."""
    out = torch.empty(*v.shape, dtype=torch.float32, device=v.device)
    single = meta.counts == 1
    for group in (np.flatnonzero(single), np.flatnonzero(~single)):
        if len(group):
            _attend_group(q, k, v, g, beta, matrices, meta, torch.as_tensor(group, device=v.device), out)
    return out


def _attend_group(q, k, v, g, beta, matrices, meta: StateMetadata, seqs: torch.Tensor, out: torch.Tensor) -> None:
    rows, valid = meta.padded_rows()  # [seqs, longest]: each sequence's tokens, padding past its count
    longest = int(meta.counts[seqs.cpu().numpy()].max())
    rows, valid, slots = rows[seqs, :longest], valid[seqs, :longest], meta.slots[seqs]
    state = matrices[slots].masked_fill(meta.fresh[seqs][:, None, None, None], 0)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [seqs, heads, longest, ...]; padding inert: k, β, g zero
        x = x[rows] * valid.view(*valid.shape, *[1] * (x.dim() - 1))
        return x.transpose(1, 2)

    q, k, v, g, beta = (padded(t) for t in (q, k, v, g, beta))
    if longest == 1:
        result, state = _recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], state)
        result = result[:, :, None]
    else:
        result, state = _chunked(q, k, v, g, beta, state)
    matrices[slots] = state.to(matrices.dtype)
    out[rows[valid]] = result.transpose(1, 2)[valid]


def _recurrent_step(q, k, v, g, beta, state):
    """One token a sequence: q, k [seqs, heads, dk], v [.., dv], g, beta [seqs, heads]; state [seqs, heads, dk, dv]."""
    state = state * g.exp()[..., None, None]
    delta = (v - torch.einsum("shkv,shk->shv", state, k)) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("shkv,shk->shv", state, q), state


def _chunked(q, k, v, g, beta, state):
    """The chunked form over [seqs, heads, length, ...] (the length padded to whole chunks here). The work
    is laid out chunk-major, [chunks, seqs · heads, CHUNK, ...] contiguous, so every product is one
    batched GEMM over contiguous matrices (strided batches make torch copy each matrix on its own)."""
    seqs, heads, length = q.shape[:3]
    pad = -length % CHUNK

    def chunk_major(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
        return t.reshape(seqs * heads, -1, CHUNK, *t.shape[3:]).transpose(0, 1).contiguous()

    q, k, v, g, beta = (chunk_major(t) for t in (q, k, v, g, beta))
    state = state.reshape(seqs * heads, *state.shape[2:])
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    decay = g.cumsum(-1)  # log of the decay from the chunk's start to each token
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise  # its strict lower triangle, with a unit diagonal
    within = (q @ k.transpose(-1, -2)) * pairwise
    # The system's inverse (a solve against the identity: 64 right-hand sides), then one product for both
    # right-hand sides — the corrected values and what each token reads of the state: 35% less time than
    # solving for their 256 columns (torch's batched triangular solve is slow on the CPU; measured).
    eye = torch.eye(CHUNK, dtype=system.dtype, device=system.device).expand_as(system)
    inverse = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)
    solved = inverse @ torch.cat([v_beta, k_beta * decay.exp()[..., None]], -1)
    new_values, reads = solved.split([v.shape[-1], k.shape[-1]], -1)
    q = q * decay.exp()[..., None]
    k_to_end = (k * (decay[..., -1:] - decay).exp()[..., None]).transpose(-1, -2).contiguous()
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = torch.empty_like(new_values)
    for i in range(q.shape[0]):  # the chunks in order, each from the state the previous one left
        corrected = new_values[i] - reads[i] @ state
        out[i] = q[i] @ state + within[i] @ corrected
        state = state * chunk_decay[i] + k_to_end[i] @ corrected
    out = out.transpose(0, 1).reshape(seqs, heads, -1, out.shape[-1])[:, :, :length]
    return out, state.reshape(seqs, heads, *state.shape[1:])
