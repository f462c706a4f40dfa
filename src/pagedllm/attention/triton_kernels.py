"""Paged attention in Triton: every query token of a step (decode or prefill chunk) against its
sequence's cached K/V, read in place through the block table.

One program per (query token, KV head) scores the KV head's group of query heads (GQA) against the
visible keys — causal, within the sliding window — a block of the paged cache at a time, with an
online softmax (flash-attention's running max and sum), soft-capping and ALiBi in the scores. K/V
rows are float (fp32 / fp16 / bf16) or q8_0 (per 32 values an fp16 scale and 32 int8). On a GPU
this runs compiled; under TRITON_INTERPRET=1 it runs on the CPU, which is how CI checks it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(cache, block_ids, offsets_in_block, kv_head, d, d_mask, valid,
               stride_block, stride_slot, stride_head, Q8: tl.constexpr):
    """[BLOCK_N, BLOCK_D] float32 cache rows for the given tokens (block id and slot within the block)."""
    base = block_ids[:, None] * stride_block + offsets_in_block[:, None] * stride_slot + kv_head * stride_head
    mask = valid[:, None] & d_mask[None, :]
    if Q8:  # q8_0 bytes: d's 32-value block starts with its fp16 scale
        block_start = (d // 32) * 34
        lo = tl.load(cache + base + block_start[None, :], mask=mask, other=0).to(tl.uint16)
        hi = tl.load(cache + base + block_start[None, :] + 1, mask=mask, other=0).to(tl.uint16)
        scale = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        q = tl.load(cache + base + (block_start + 2 + d % 32)[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
        return q.to(tl.float32) * scale
    return tl.load(cache + base + d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def paged_attention_kernel(
    out, q, k_cache, v_cache, block_tables, token_seq, positions, alibi, sinks,
    scale, softcap, window,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_block, stride_slot, stride_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    Q8: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(token_seq + token)
    position = tl.load(positions + token)  # this query's position: it sees keys 0..position
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask, d_mask = h < GROUP, d < HEAD_DIM
    heads = kv_head * GROUP + h
    query = tl.load(q + token * stride_q_token + heads[:, None] * stride_q_head + d[None, :],
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    slopes = tl.load(alibi + heads, mask=h_mask, other=0.0) if HAS_ALIBI else tl.zeros([BLOCK_H], tl.float32)

    first = tl.maximum(position + 1 - window, 0)  # window: the context length where there is none
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    if HAS_SINKS:  # the sink starts the softmax: a term e^(sink − max) with no value (gpt-oss)
        running_max = tl.load(sinks + heads, mask=h_mask, other=0.0)
        running_sum = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range((first // BLOCK_N) * BLOCK_N, position + 1, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)
        visible = (key_pos <= position) & (key_pos >= first)
        block_ids = tl.load(block_tables + seq * stride_table + key_pos // BLOCK_SIZE, mask=visible, other=0)
        slot = key_pos % BLOCK_SIZE
        keys = _load_rows(k_cache, block_ids, slot, kv_head, d, d_mask, visible, stride_block, stride_slot,
                          stride_head, Q8)
        scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2) * scale  # [BLOCK_H, BLOCK_N]
        if HAS_SOFTCAP:
            scores = softcap * (2 * tl.sigmoid(2 * scores / softcap) - 1)  # cap · tanh(s / cap)
        if HAS_ALIBI:
            scores += slopes[:, None] * (key_pos - position).to(tl.float32)[None, :]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        values = _load_rows(v_cache, block_ids, slot, kv_head, d, d_mask, visible, stride_block, stride_slot,
                            stride_head, Q8)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        running_max = new_max
    result = acc / running_sum[:, None]
    tl.store(out + token * stride_o_token + heads[:, None] * stride_o_head + d[None, :],
             result.to(out.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
