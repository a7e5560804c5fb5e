"""The DeepSeek-V3 transformer: blocks, Multi-Token Prediction, and the model that joins them.

Layers are kept in a ModuleDict keyed by their global index, so parameter names are the same
whichever pipeline stage holds a layer, and a stage is the model with the other layers removed.
"""

from dataclasses import dataclass

import torch
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.model.attention import MLA, document_causal_mask
from megatron_ds.model.moe import MoE
from megatron_ds.model.norm import MLP, RMSNorm
from megatron_ds.model.rope import rotary_table
from megatron_ds.model.vocab import Embedding, linear_cross_entropy


class Block(nn.Module):
    """Pre-norm block: MLA then a dense FFN (first n_dense_layers) or DeepSeekMoE."""

    def __init__(self, layer_id: int, args: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x: torch.Tensor, rope, attn_mask) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attn_mask)
        return x + self.ffn(self.ffn_norm(x))


class OutputHead(nn.Module):
    """The output projection, and the per-token cross-entropy of its logits (vocab-parallel under TP)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.linear = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)

    def token_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """fp32 cross-entropy of each position's logits (from hidden state h) against its label."""
        return linear_cross_entropy(h, self.linear.weight, labels)


class MTPModule(nn.Module):
    """Multi-Token Prediction module k (report section 2.2, eq. 21).

    Combines the previous depth's hidden state with the embedding of the token k ahead:
    M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})], then one transformer block and its own final
    norm. It returns the normalised output h^k, which the shared output head reads (eq. 23 has no
    norm in OutHead) and module k+1 consumes; h^0 is the main model's normalised final output.
    This is how Megatron-Core, vLLM and Hugging Face run the published MTP weights. The
    concatenation order (embedding first) is that of the published checkpoint's `eh_proj`.
    """

    def __init__(self, layer_id: int, args: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: torch.Tensor, next_embedding: torch.Tensor, rope, attn_mask) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(next_embedding), self.hnorm(h)], dim=-1))
        return self.norm(self.block(h, rope, attn_mask))


@dataclass
class LossOutput:
    lm_loss: torch.Tensor  # mean next-token cross-entropy over unmasked tokens
    mtp_loss: torch.Tensor  # mean over the D modules of their mean cross-entropy (0 without MTP)


class Transformer(nn.Module):
    def __init__(self, args: ModelConfig):
        super().__init__()
        self.args = args
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = OutputHead(args.dim, args.vocab_size)
        self.mtp = nn.ModuleList(MTPModule(args.n_layers + k, args) for k in range(args.mtp_depth))
        self._rope_tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ):
        """Run this model (or pipeline stage).

        inputs: token ids [batch, seq] on the first stage, hidden states [batch, seq, dim] on later ones.
        Returns hidden states on a non-final stage; logits when no labels are given; else a LossOutput.
        """
        h = inputs if inputs.is_floating_point() else self.embed(inputs)
        rope = self.rope(h.size(1), h.device)
        attn_mask = None if doc_ids is None else document_causal_mask(doc_ids)
        for layer in self.layers.values():
            h = layer(h, rope, attn_mask)
        if self.head is None:
            return h
        h = self.norm(h)
        if labels is None:
            return self.head(h)
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.float32)
        hidden, targets, masks = [h], [labels], [loss_mask]
        for k, module in enumerate(self.mtp, start=1):
            # Depth k at position i sees token t_{i+k} (= labels[i+k-1]) and predicts t_{i+k+1}.
            h = module(h, self.embed(labels.roll(-(k - 1), dims=1)), rope, attn_mask)
            valid = loss_mask.roll(-k, dims=1).clone()
            valid[:, labels.size(1) - k :] = 0
            hidden.append(h)
            targets.append(labels.roll(-k, dims=1))
            masks.append(valid)
        # One pass of the shared head over every depth: its weight gradient is formed once.
        token_losses = self.head.token_loss(torch.stack(hidden), torch.stack(targets))
        losses = [self._masked_mean(loss, mask) for loss, mask in zip(token_losses, masks)]
        mtp_loss = torch.stack(losses[1:]).mean() if self.mtp else losses[0].new_zeros(())
        return LossOutput(losses[0], mtp_loss)

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary table, built once per length and device: not a host-to-GPU copy every forward."""
        key = (seq_len, device)
        if key not in self._rope_tables:
            self._rope_tables[key] = rotary_table(self.args, seq_len, device)
        return self._rope_tables[key]

    @staticmethod
    def _masked_mean(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (token_loss * mask).sum() / mask.sum().clamp(min=1)
