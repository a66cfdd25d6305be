"""The expert bank of mixture-of-experts layers, dense or quantized.

All experts of a layer live in one stacked weight, [E, out, in], so a token's chosen
experts are applied with one gathered matmul (`mx.gather_mm` / `mx.gather_qmm`) rather
than a Python loop over experts. With many token-expert pairs (prefill) the pairs are
first sorted by expert so each expert's weight is read once; a decode step skips that.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .base import swiglu

SORT_THRESHOLD = 64  # token-expert pairs above which sorting by expert pays for itself


class ExpertLinear(nn.Module):
    """E stacked linear maps without bias: weight [E, out, in]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        bound = 1.0 / math.sqrt(input_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x [..., 1, in] gathered against experts `indices` [...] -> [..., 1, out]."""
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        """Quantized copy, for `nn.quantize`."""
        return QuantizedExpertLinear.from_dense(self, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    """ExpertLinear with weights packed by `mx.quantize` (affine, per group of inputs)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        dense = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *b = mx.quantize(dense, group_size, bits, mode=mode)
        if b:
            self.biases = b[0]
        self.freeze()

    @classmethod
    def from_dense(cls, layer: ExpertLinear, group_size: int, bits: int, mode: str):
        """Quantize an ExpertLinear's weight."""
        E, out, inp = layer.weight.shape
        q = cls(inp, out, E, group_size, bits, mode)
        q.weight, q.scales, *b = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if b:
            q.biases = b[0]
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """As ExpertLinear.__call__, on packed weights."""
        return mx.gather_qmm(x, self.weight, self.scales, self.get("biases"),
                             rhs_indices=indices, transpose=True, group_size=self.group_size,
                             bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)


class ExpertGLU(nn.Module):
    """SwiGLU experts: down(silu(gate(x)) * up(x)) with each token's own experts."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = ExpertLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = ExpertLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = ExpertLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> [..., k, D] (one output per chosen expert)."""
        k = indices.shape[-1]
        lead = x.shape[:-1]
        D = x.shape[-1]
        pairs = math.prod(lead) * k
        if pairs >= SORT_THRESHOLD:
            flat_idx = indices.reshape(-1)  # [N*k]
            order = mx.argsort(flat_idx)
            inverse = mx.argsort(order)
            xs = x.reshape(-1, 1, D)[order // k]  # [N*k, 1, D], grouped by expert
            idx = flat_idx[order]
            y = self._glu(xs, idx, True)  # [N*k, 1, D]
            return y[inverse].reshape(*lead, k, D)
        xs = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        return self._glu(xs, indices, False).squeeze(-2)  # [..., k, D]

    def _glu(self, x, idx, sorted_indices):
        """down(silu(gate(x)) * up(x)) through the experts `idx` picks for each row."""
        g = self.gate_proj(x, idx, sorted_indices)
        u = self.up_proj(x, idx, sorted_indices)
        return self.down_proj(swiglu(g, u), idx, sorted_indices)
