"""Exact fast paths through CLIP's text tower for prompt learning: a shared prefix, length buckets.

CLIP's text attention is causal: position i's output depends on positions 0..i only. In a
CoOp prompt ``[SOS, ctx_1 .. ctx_n, name tokens, ., EOS]`` the first n + 1 positions are the
same for every class, so their hidden states, keys and values are too. ``encode_prefixed``
runs that prefix once (a batch of one per prompt set) and every class suffix attends to the
prefix's keys and values, per layer: ``softmax(q_s [K_p ; K_s]^T / sqrt(d) + causal) [V_p ; V_s]``.
With ImageNet's 1,000 names and 16 context vectors, a step's 30,000 token positions (every
prompt cut at the longest one's end) become 4,194.

The suffixes are cut after their end token and grouped into buckets of similar length
(``length_buckets``): a bucket of short names does not pay for the longest one. Padding
after a sequence's end needs no mask: causal attention never lets a real token see it.
In the last layer only the end token's output is read, so the other positions there
compute their keys and values alone.

The blocks must be open_clip's standard ``ResidualAttentionBlock`` (pre-LN, ``nn.MultiheadAttention``,
optional layer scales); ``supports_prefix`` says whether a tower qualifies, and callers
fall back to ``TextTower.encode_embeddings`` (the reference path) when it does not.

Mixed precision: ``amp_dtype`` selects bfloat16 autocast on CUDA (where the GPU has it);
the learned context stays a float32 parameter (the master copy), as do the tower's
weights, so the optimiser steps in float32. On the CPU everything runs in float32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oodcli.errors import UsageError

#: the fixed cost of one more bucket, in padded tokens: a bucket is a pass of its own through
#: every layer, cheap on a CPU, a few hundred kernel launches on a GPU
BUCKET_OVERHEAD = {"cpu": 16, "cuda": 1024}
PRECISIONS = ("auto", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision '{precision}'; choose from {', '.join(PRECISIONS)}")


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a training step: bfloat16 on a CUDA device that has it under
    ``precision='auto'``, else None (float32 throughout)."""
    check_precision(precision)
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def supports_prefix(tower) -> bool:
    """Whether ``encode_prefixed`` computes exactly what ``tower.encode_embeddings`` does:
    features read at the end token, a causal mask, standard pre-LN blocks."""
    cached = getattr(tower, "_supports_prefix", None)
    if cached is None:
        cached = tower._supports_prefix = _check_blocks(tower)
    return cached


def _check_blocks(tower) -> bool:
    text = tower.text
    if not tower.reads_end_token or getattr(text.transformer, "grad_checkpointing", False):
        return False
    mask = text.attn_mask
    causal = torch.full(mask.shape, float("-inf"), device=mask.device).triu(1)
    if not torch.equal(mask.float(), causal):
        return False
    for block in text.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            return False
        if attn.bias_k is not None or attn.add_zero_attn or (attn.dropout and attn.training):
            return False
        if not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp")):
            return False
    return True


def length_buckets(lengths, overhead: int = BUCKET_OVERHEAD["cpu"]) -> list[np.ndarray]:
    """Indices of ``lengths`` grouped into buckets, shortest first, that minimise the padded
    tokens (each bucket padded to its longest) plus ``overhead`` per bucket: an exact dynamic
    programme over the distinct lengths."""
    lengths = np.asarray(lengths)
    values, counts = np.unique(lengths, return_counts=True)
    k = len(values)
    best = np.zeros(k + 1)
    cut = np.zeros(k + 1, dtype=int)
    for j in range(1, k + 1):
        rows = np.cumsum(counts[:j][::-1])[::-1]  # rows[i]: sequences with the i-th .. j-th lengths
        costs = best[:j] + rows * values[j - 1] + overhead
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    bounds, j = [], k
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [np.flatnonzero((lengths >= values[i]) & (lengths <= values[j - 1])) for i, j in reversed(bounds)]


# ---- one block, on a segment that may attend to earlier keys and values -----------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(-2, -3)  # [..., L, W] -> [..., H, L, d]


def _qkv(block, x: torch.Tensor, need_q: bool = True) -> tuple:
    """The block's queries, keys and values [..., H, L, d] of its input ``x`` [..., L, W]."""
    attn, width = block.attn, x.shape[-1]
    h = block.ln_1(x)
    if attn.in_proj_weight is not None:
        weights = attn.in_proj_weight.split(width)
    else:
        weights = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
    biases = (None,) * 3 if attn.in_proj_bias is None else attn.in_proj_bias.split(width)
    out = [None if (i == 0 and not need_q) else _heads(F.linear(h, w, b), attn.num_heads)
           for i, (w, b) in enumerate(zip(weights, biases))]
    return tuple(out)


def _attend(q, k, v, past_k, past_v, query_pos):
    """Causal attention of queries at positions ``query_pos`` (of this segment) over the
    segment's keys ``k`` and, before them, all of ``past_k`` (broadcast over the batch)."""
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    later = torch.arange(k.shape[-2], device=q.device) > query_pos[..., None]
    scores = scores.masked_fill(later, float("-inf"))
    if past_k is None:
        return scores.softmax(dim=-1) @ v
    past = (q @ past_k.transpose(-1, -2)) * scale
    batch = torch.broadcast_shapes(past.shape[:-1], scores.shape[:-1])  # one suffix set, P prefixes
    weights = torch.cat([past.expand(*batch, -1), scores.expand(*batch, -1)], dim=-1).softmax(dim=-1)
    m = past_k.shape[-2]
    return weights[..., :m] @ past_v + weights[..., m:] @ v


def _finish(block, x, attended):
    """The rest of the residual block after attention: out_proj, layer scales, MLP."""
    identity = torch.nn.Identity()
    x = x + getattr(block, "ls_1", identity)(block.attn.out_proj(attended.transpose(-2, -3).flatten(-2)))
    return x + getattr(block, "ls_2", identity)(block.mlp(block.ln_2(x)))


# ---- the encoder ------------------------------------------------------------------------------


def prefix_states(tower, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values [P, H, m, d] of the shared prefix ``prefix`` [P, m, width]
    (token embeddings, before the positional ones)."""
    text = tower.text
    dtype = text.transformer.get_cast_dtype()
    m = prefix.shape[1]
    x = prefix.to(dtype) + text.positional_embedding[:m].to(dtype)
    pos = torch.arange(m, device=x.device)
    blocks = text.transformer.resblocks
    states = []
    for i, block in enumerate(blocks):
        q, k, v = _qkv(block, x, need_q=i < len(blocks) - 1)
        states.append((k, v))
        if i < len(blocks) - 1:  # the last layer's prefix outputs are never read
            x = _finish(block, x, _attend(q, k, v, None, None, pos))
    return states


def encode_suffix(tower, states, suffix: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """L2-normalised features [P, B, D] of suffixes ``suffix`` [1 or P, B, S, width] (token
    embeddings after the prefix) read at position ``lengths - 1`` [B] of each suffix, every
    suffix attending to the prefix whose per-layer ``states`` (``prefix_states``) it follows."""
    text = tower.text
    dtype = text.transformer.get_cast_dtype()
    m = states[0][0].shape[-2]
    s = suffix.shape[-2]
    x = suffix.to(dtype) + text.positional_embedding[m : m + s].to(dtype)
    pos = torch.arange(s, device=x.device)
    ends = (lengths - 1).to(x.device)
    past = [(k[:, None], v[:, None]) for k, v in states]  # [P, 1, H, m, d]: broadcast over the suffixes
    blocks = text.transformer.resblocks
    for block, (pk, pv) in zip(blocks[:-1], past[:-1]):
        q, k, v = _qkv(block, x)
        x = _finish(block, x, _attend(q, k, v, pk, pv, pos))
    block, (pk, pv) = blocks[-1], past[-1]
    q, k, v = _qkv(block, x)
    pick = ends.view(1, -1, 1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1, q.shape[-1])
    q_end = q.gather(-2, pick)  # [P, B, H, 1, d]: the last layer's only query that is read
    x_end = x.gather(-2, ends.view(1, -1, 1, 1).expand(x.shape[0], -1, 1, x.shape[-1]))
    x_end = _finish(block, x_end, _attend(q_end, k, v, pk, pv, ends.view(-1, 1, 1)))[..., 0, :]
    out = text.ln_final(x_end)
    proj = text.text_projection
    if proj is not None:
        out = proj(out) if isinstance(proj, torch.nn.Linear) else out @ proj
    return F.normalize(out.float(), dim=-1).expand(len(states[0][0]), -1, -1)


def encode_prefixed(tower, prefix: torch.Tensor, suffix: torch.Tensor, lengths: torch.Tensor,
                    overhead: int | None = None) -> torch.Tensor:
    """L2-normalised text features [P, C, D] of the sequences ``[prefix_p ; suffix_c]``.

    ``prefix`` [P, m, width]: token embeddings shared by every class of prompt set p (SOS and
    a shared context, or SOS alone); ``suffix`` [1 or P, C, S, width] (1 when the same for
    every prompt set, e.g. the class names' tokens); ``lengths`` [C] each suffix's length
    through its end token. Equals ``tower.encode_embeddings`` on the concatenated sequences."""
    if overhead is None:
        overhead = BUCKET_OVERHEAD.get(prefix.device.type, BUCKET_OVERHEAD["cuda"])
    states = prefix_states(tower, prefix)
    lengths_cpu = lengths.cpu()
    parts, order = [], []
    for idx in length_buckets(lengths_cpu.numpy(), overhead):
        n = int(lengths_cpu[idx].max())
        sel = torch.from_numpy(idx).to(suffix.device)
        parts.append(encode_suffix(tower, states, suffix[:, sel, :n], lengths_cpu[idx]))
        order.append(idx)
    feats = torch.cat(parts, dim=1)
    inverse = torch.from_numpy(np.argsort(np.concatenate(order))).to(feats.device)
    return feats[:, inverse]
