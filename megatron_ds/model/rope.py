"""Rotary position embedding for the decoupled RoPE dimensions, with YaRN extension.

YaRN (report section 4.3; Peng et al. 2023) interpolates the low-frequency rotations by the
scale s, keeps the high-frequency ones, ramps between them by rotation count, and sharpens
the softmax by mscale^2. It touches only the decoupled key/query dimensions.
"""

import math

import torch

from megatron_ds.config import ModelConfig


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


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of the last dimension; x is [batch, seq, heads, dim]."""
    cos, sin = (t[None, :, None, :] for t in rope)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
