"""nn.MultiheadAttention's forward recomputed during capture, so that its packed input projection has tensors to record
(the kernel is :class:`tracin.layers.linear.MultiheadAttentionHandler`, a Linear layer over them).

``nn.MultiheadAttention`` applies ``in_proj_weight`` [3E, E] (queries, keys and values stacked) and ``out_proj``
functionally, so no module hook sees their inputs or output gradients. During capture the handler recomputes the
forward from the module's own parameters: the projection as ``F.linear`` (recorded), the attention with the same
masks, and ``out_proj`` called as a module (so its own Linear handler records it). The recomputed output replaces
the module's, after the engine checks that the two are equal.

The per-example gradient of ``in_proj_weight`` is ``sum_t D_t^T x_t`` with D the gradient at the packed projection
[B, T, 3E]: for self-attention (query, key and value the same tensor) that is one Linear call. For cross-attention the
three blocks take different inputs; each block is recorded with its output gradient placed in its third of the 3E
rows (zeros elsewhere), and the three are concatenated along positions, which gives the same sum. Either way the
Linear kernels (ghost, materialised, K-FAC, projection) apply unchanged.

Not covered (the parameters then take the exact per-example path): separate q/k/v weights (``kdim``/``vdim`` other
than ``embed_dim``), ``bias_k``/``bias_v``, ``add_zero_attn``, unbatched inputs, and dropout while training.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Recorded, Rerun

ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
DEFAULTS: Dict[str, Any] = {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
                            "average_attn_weights": True, "is_causal": False}
PACKED, QUERY, KEY, VALUE = 0, 1, 2, 3  # Call.part: the whole packed projection, or one of its three blocks


def recompute(mha: nn.MultiheadAttention, args: Tuple, kwargs: Dict[str, Any]) -> Optional[Rerun]:
    """``mha``'s forward on batch-first copies of its inputs: the in-projection (recorded), the attention, and
    ``out_proj`` as a module call (its own handler records it); None for a call form without a kernel."""
    given = {**DEFAULTS, **dict(zip(ARGUMENTS, args)), **kwargs}
    query, key, value = given["query"], given["key"], given["value"]
    if query.dim() != 3 or (mha.training and mha.dropout > 0):
        return None
    inputs = [t if mha.batch_first else t.transpose(0, 1) for t in (query, key, value)]  # [N, L or S, E]
    q, k, v, parts = _projections(mha, inputs, same=query is key and key is value)
    attended, weights = _attend(mha.num_heads, q, k, v, given)
    output = mha.out_proj(attended)
    return Rerun((output if mha.batch_first else output.transpose(0, 1), weights), parts)


def _projections(mha: nn.MultiheadAttention, inputs: List[torch.Tensor], same: bool):
    """q [N, L, E], k and v [N, S, E], and the recorded projections."""
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    if same:
        packed = F.linear(inputs[0], weight, bias)
        q, k, v = packed.chunk(3, dim=-1)
        return q, k, v, [Recorded((inputs[0],), packed, PACKED)]
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    outs = [F.linear(x, w, b) for x, w, b in zip(inputs, weight.chunk(3), biases)]
    return (*outs, [Recorded((x,), out, part) for x, out, part in zip(inputs, outs, (QUERY, KEY, VALUE))])


def _attend(heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, given: Dict[str, Any]):
    """Scaled dot-product attention over heads, as ``F.multi_head_attention_forward`` computes it: the output
    [N, L, E] and, with ``need_weights``, the attention weights (averaged over heads unless asked not to)."""
    N, L, E = q.shape
    S = k.shape[1]
    q, k, v = (t.reshape(N, -1, heads, E // heads).transpose(1, 2) for t in (q, k, v))  # [N, H, L or S, E/H]
    mask = _merged_mask(given["attn_mask"], given["key_padding_mask"], (N, heads, L, S), q.dtype)
    weights = None
    if given["need_weights"]:
        scores = (q * (E // heads) ** -0.5) @ k.transpose(-2, -1)
        attention = (scores if mask is None else scores + mask).softmax(dim=-1)  # [N, H, L, S]
        out = attention @ v
        weights = attention.mean(dim=1) if given["average_attn_weights"] else attention
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(N, L, E), weights


def _merged_mask(attn_mask: Optional[torch.Tensor], padding: Optional[torch.Tensor], shape: Tuple[int, int, int, int],
                 dtype: torch.dtype) -> Optional[torch.Tensor]:
    """One additive float mask broadcastable to [N, H, L, S] from an attention mask ([L, S] or [N * H, L, S]) and a
    key padding mask ([N, S]); boolean masks are True where attention is not allowed."""
    N, H, L, S = shape
    merged = None
    if attn_mask is not None:
        merged = _additive(attn_mask, dtype).reshape(1, 1, L, S) if attn_mask.dim() == 2 else \
            _additive(attn_mask, dtype).reshape(N, H, L, S)
    if padding is not None:
        keys = _additive(padding, dtype).reshape(N, 1, 1, S)
        merged = keys if merged is None else merged + keys
    return merged


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
