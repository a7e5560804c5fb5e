"""Model FLOPs per token of a training step, the numerator of MFU.

Counted as 3 x forward (backward costs twice the forward) of:
- every matrix multiply with an activated weight: 2 FLOPs per weight per token. That is all
  projections of MLA, the dense FFNs, the router, the shared experts, the K routed experts a
  token uses, the output head once per prediction (main + D MTP modules) and MTP's eh_proj;
  not the embedding lookup;
- causal attention: QK^T (2 * n_heads * qk_head_dim) and AV (2 * n_heads * v_head_dim) per
  attended position, with (seq_len + 1) / 2 positions on average, in every main and MTP block.
Recomputation is not counted (this is model FLOPs, not hardware FLOPs).
"""

from megatron_ds.config import ModelConfig
from megatron_ds.model.size import parameter_counts


def training_flops_per_token(args: ModelConfig, seq_len: int) -> float:
    counts = parameter_counts(args)
    matmul_weights = (
        counts.main_activated - counts.embedding + counts.mtp_activated + args.mtp_depth * counts.head
    )
    attended = (seq_len + 1) / 2
    attention = 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * attended
    blocks = args.n_layers + args.mtp_depth
    forward = 2 * matmul_weights + blocks * attention
    return 3 * forward
