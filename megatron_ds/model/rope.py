"""Rotary position embedding for the decoupled RoPE dimensions, with YaRN extension.

YaRN (report section 4.3; Peng et al. 2023) interpolates the low-frequency rotations by the
scale s, keeps the high-frequency ones, ramps between them by rotation count, and sharpens
the softmax by mscale^2. It touches only the decoupled key/query dimensions.
"""

import math

import torch

from megatron_ds.config import ModelConfig
from megatron_ds.model.compiled import accumulator, run_fused


def _correction_dim(rotations: float, dim: int, base: float, seq_len: int) -> float:
    """The dimension index whose frequency completes `rotations` turns over `seq_len` positions."""
    return dim * math.log(seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(args: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies of the qk_rope_head_dim dimensions, YaRN-scaled when rope_factor > 1."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_factor > 1:
        low = max(math.floor(_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(args.beta_slow, dim, base, args.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 for fast rotations (extrapolate), 0 for slow ones (interpolate)
        freqs = freqs / args.rope_factor * (1 - keep) + freqs * keep
    return freqs


def yarn_softmax_scale(args: ModelConfig) -> float:
    """1/sqrt(d_qk), sharpened by YaRN's mscale^2 when the context is extended."""
    scale = args.qk_head_dim**-0.5
    if args.rope_factor > 1:
        mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
        scale *= mscale * mscale
    return scale


def rotary_table(args: ModelConfig, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, qk_rope_head_dim / 2] for positions 0..seq_len-1."""
    angles = torch.outer(
        torch.arange(seq_len, device=device, dtype=torch.float32), rope_frequencies(args).to(device)
    )
    return angles.cos(), angles.sin()


# MLA's queries and keys are [nope | rope] per head, and only the rope part turns (consecutive pairs,
# as DeepSeek's reference model rotates them). Written as cat(nope, rotate(rope)), a step copies the
# nope parts in strided cat kernels (forward) and splits and re-concatenates the gradients (backward),
# besides the rotation's own small kernels. The two functions below do each direction in one pass,
# fused by Inductor on a GPU (megatron_ds.model.compiled).


def rotate_tail(q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """q [batch, seq, heads, nope + rope] with its last rope dimensions rotated."""
    return RotateTail.apply(q, *rope)


def keys_and_values(
    kv: torch.Tensor, k_rope: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], nope_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's per-head keys [k^C | RoPE(k^R)] and values from kv = [k^C | v^C] per head, [batch, seq,
    heads, nope + v], and the rope key shared by all heads, k_rope [batch, seq, rope]."""
    return KeysAndValues.apply(kv, k_rope, *rope, nope_dim)


class RotateTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, cos, sin):
        ctx.save_for_backward(cos, sin)
        return run_fused(_rotate_tail, q, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return run_fused(_rotate_tail, grad, cos, sin, True), None, None  # a rotation's adjoint turns back


class KeysAndValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, k_rope, cos, sin, nope_dim):
        ctx.save_for_backward(cos, sin)
        ctx.nope_dim = nope_dim
        return run_fused(_keys_and_values, kv, k_rope, cos, sin, nope_dim)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grad_kv, grad_k_rope = run_fused(_keys_and_values_backward, grad_k, grad_v, cos, sin, ctx.nope_dim)
        return grad_kv, grad_k_rope, None, None, None


def _rotate_pairs(x, cos, sin, inverse: bool = False):
    """x [batch, seq, heads, dim] with pairs rotated by the angles of cos, sin [seq, dim / 2] (or back),
    computed in fp32 (or wider) and rounded once."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if inverse:
        sin = -sin
    pairs = x.to(accumulator(x.dtype)).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _rotate_tail(q, cos, sin, inverse: bool):
    rope_dim = 2 * cos.size(-1)
    return torch.cat([q[..., :-rope_dim], _rotate_pairs(q[..., -rope_dim:], cos, sin, inverse)], dim=-1)


def _keys_and_values(kv, k_rope, cos, sin, nope_dim: int):
    k_nope, v = kv.split([nope_dim, kv.size(-1) - nope_dim], dim=-1)
    k_rope = _rotate_pairs(k_rope.unsqueeze(2), cos, sin).expand(-1, -1, kv.size(2), -1)
    # v is copied out of kv: a custom function's outputs must not be views of its inputs, and the
    # attention kernels want it contiguous anyway.
    return torch.cat([k_nope, k_rope], dim=-1), v.clone(memory_format=torch.contiguous_format)


def _keys_and_values_backward(grad_k, grad_v, cos, sin, nope_dim: int):
    """Gradients of kv and of the shared rope key (summed in fp32 or wider over the heads that read it)."""
    grad_k_rope = grad_k[..., nope_dim:].to(accumulator(grad_k.dtype)).sum(2, keepdim=True)
    grad_k_rope = _rotate_pairs(grad_k_rope, cos, sin, inverse=True).squeeze(2).to(grad_k.dtype)
    return torch.cat([grad_k[..., :nope_dim], grad_v], dim=-1), grad_k_rope
