"""Multi-head Latent Attention (report section 2.1.1).

Queries and keys/values are compressed to low-rank latents (c^Q, c^KV) and expanded per head;
position enters only through a decoupled RoPE part: per-head for queries, one key shared by all
heads. Head counts are read off the tensors, so the same code runs with heads split by tensor
parallelism.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.model.norm import RMSNorm
from megatron_ds.model.rope import keys_and_values, rotate_tail, yarn_softmax_scale


class MLA(nn.Module):
    def __init__(self, args: ModelConfig):
        super().__init__()
        self.args = args
        self.softmax_scale = yarn_softmax_scale(args)
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, args.n_heads * args.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * args.qk_head_dim, bias=False)  # W^UQ, W^QR
        # W^DKV and W^KR in one matrix: the latent c^KV and the shared rope key k^R.
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.norm_eps)
        # W^UK and W^UV in one matrix.
        self.wkv_b = nn.Linear(
            args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False
        )
        self.wo = nn.Linear(args.n_heads * args.v_head_dim, args.dim, bias=False)
        self.attention = Attention()

    def forward(self, x: torch.Tensor, rope, attn_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.args
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if a.q_lora_rank == 0 else self.q_up(self.wq_a(x))
        q = rotate_tail(q.view(bsz, seqlen, -1, a.qk_head_dim), rope)  # [q^C | RoPE(q^R)] per head

        kv, k_rope = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        kv = self.kv_up(kv).view(bsz, seqlen, -1, a.qk_nope_head_dim + a.v_head_dim)
        k, v = keys_and_values(kv, k_rope, rope, a.qk_nope_head_dim)

        return self.wo(self.attention(q, k, v, attn_mask, self.softmax_scale))

    # The up-projections of the latents, which selective recomputation may replay (report 3.2.3).
    def q_up(self, c_q: torch.Tensor) -> torch.Tensor:
        return self.wq_b(self.q_norm(c_q))

    def kv_up(self, c_kv: torch.Tensor) -> torch.Tensor:
        return self.wkv_b(self.kv_norm(c_kv))


class Attention(nn.Module):
    """Softmax attention over [batch, seq, heads, dim] inputs (queries and keys 192 wide, values 128 in
    DeepSeek-V3), causal unless a mask is given; returns [batch, seq, heads * value dim]."""

    def forward(self, q, k, v, attn_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            is_causal=attn_mask is None,
            scale=scale,
        )
        return out.transpose(1, 2).flatten(2)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq] mask: causal, and a token sees only its own document."""
    seqlen = doc_ids.size(1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc).unsqueeze(1)
