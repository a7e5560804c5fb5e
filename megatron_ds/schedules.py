"""Schedules driven by consumed tokens, as the report states them (section 4.2).

Learning rate, global batch ramp-up, the balance-bias update speed and the MTP loss weight
are pure functions of (step, tokens), so a resumed run continues on exactly the same curve.
"""

import math

from megatron_ds.config import TrainConfig


def _cosine(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def learning_rate(t: TrainConfig, step: int, tokens: float) -> float:
    """Linear warmup over warmup_steps, then the configured decay by tokens."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        return _cosine(t.lr, t.min_lr, tokens / t.decay_tokens)
    if tokens < t.constant_tokens:
        return t.lr
    decayed = tokens - t.constant_tokens
    if t.lr_schedule == "wsd":
        return t.lr + (t.min_lr - t.lr) * min(decayed / t.decay_tokens, 1.0)
    # deepseek: constant, cosine decay to min_lr, then the tail constants.
    if decayed < t.decay_tokens:
        return _cosine(t.lr, t.min_lr, decayed / t.decay_tokens)
    tail = decayed - t.decay_tokens
    for lr, length in zip(t.final_lrs, t.final_tokens):
        if tail < length:
            return lr
        tail -= length
    return t.final_lrs[-1] if t.final_lrs else t.min_lr


def global_batch_size(t: TrainConfig, tokens: float, granularity: int) -> int:
    """Sequences per step: linear ramp from batch_rampup_start over batch_rampup_tokens.

    Rounded down to a multiple of `granularity` (micro-batch x data-parallel size).
    """
    if t.batch_rampup_start >= t.global_batch_size or tokens >= t.batch_rampup_tokens:
        return t.global_batch_size
    size = (
        t.batch_rampup_start + (t.global_batch_size - t.batch_rampup_start) * tokens / t.batch_rampup_tokens
    )
    return max(granularity, int(size) // granularity * granularity)


def bias_update_speed(t: TrainConfig, tokens: float) -> float:
    """gamma = 0.001 until the last stretch of training, then 0 (report section 4.2)."""
    return t.bias_update_speed if tokens < t.bias_update_stop_tokens else 0.0


def mtp_loss_weight(t: TrainConfig, tokens: float) -> float:
    """lambda = 0.3 for the first 10T tokens, 0.1 afterwards (report section 4.2)."""
    return t.mtp_loss_weight if tokens < t.mtp_weight_switch_tokens else t.mtp_loss_weight_late
