"""The vocabulary-sized layers, embedding and output head, with their weight gradients formed in place.

Their weights are [vocabulary, dim] (129,280 x 7,168 in DeepSeek-V3), so every pass over a weight's
gradient counts. Under Megatron-Core's DDP both accumulate their weight gradient straight into the
parameter's fp32 `main_grad` buffer, instead of handing DDP's hook a bf16 `.grad` to add in (and
autograd a second one to add first, when the main model and MTP both use the layer).

Output head. Written as `F.cross_entropy(F.linear(h, W).float(), labels)`, a step keeps fp32 logits and their
fp32 log-softmax (2 x 4 bytes per token and vocabulary entry: 4 GB per 4096 tokens of a 129,280-word
vocabulary), runs the softmax forward and backward as separate passes over them, and hands back a
bf16 gradient of W. Here the forward keeps only the bf16 logits and each token's log-sum-exp; the
backward turns the logits into their gradient in one fused pass and the weight-gradient GEMM
accumulates into `main_grad`. Losses and softmax are computed in fp32 from the logits as the GEMM
rounded them, as before. This runs where Inductor compiles the bodies (CUDA GPUs); CPUs keep torch's
cross-entropy (`linear_cross_entropy`).

Embedding. The lookup's backward scatters the output gradient's rows, in fp32, into `main_grad`
(deterministically: index_put_ with accumulate sorts the ids), where nn.Embedding's fills a zeroed
bf16 tensor of the whole weight's size for DDP to add.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ds.model import compiled


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fp32, or h's dtype if wider; shaped like labels) of the logits h W^T.

    h: [..., dim]; weight: [vocab, dim]; labels: [...] (every label a valid vocabulary index).
    Where the kernels are not compiled (CPUs), torch's own cross-entropy runs instead: its fused
    log-softmax beats the function's bodies run op by op (1.45-1.74x faster on a 2-core CPU,
    docs/benchmarks/head_loss_cpu.md), and no DDP buffer waits there for the weight gradient.
    """
    h, flat_labels = h.flatten(0, -2), labels.flatten()
    if compiled.compiles(h.device.type):
        loss = LinearCrossEntropy.apply(h, weight, flat_labels)
    else:
        logits = F.linear(h, weight)
        loss = F.cross_entropy(logits.to(compiled.accumulator(logits.dtype)), flat_labels, reduction="none")
    return loss.view_as(labels)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels):
        logits = F.linear(h, weight)
        loss, lse = compiled.run_fused(_cross_entropy, logits, labels)
        ctx.save_for_backward(h, labels, logits, lse)
        ctx.weight = weight  # itself, with its main_grad (see EmbeddingIntoMainGrad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (h, labels, logits, lse), weight = ctx.saved_tensors, ctx.weight
        # The logits become their gradient in place: no second [tokens, vocab] buffer. (A second
        # backward through the graph then fails on the saved tensor's version, as autograd's own.)
        grad_logits = compiled.run_fused(_cross_entropy_backward_, logits, lse, labels, grad_loss)
        grad_h = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = weight_gradient(weight, grad_logits, h) if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, None


def weight_gradient(weight: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The gradient grad_out^T x of a linear layer's weight [out, in].

    Under Megatron-Core's DDP (the weight has an fp32 `main_grad` buffer) the GEMM accumulates into
    that buffer and None is returned: DDP's hook then has no bf16 `.grad` to add in, a pass over the
    whole weight saved (the output head's is 129,280 x 7,168). That hook needs a `.grad` only with
    overlap_grad_reduce, which parallel/megatron_optimizer.py leaves off.
    """
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None:
        return grad_out.t() @ x
    if main_grad.dtype == grad_out.dtype:
        main_grad.addmm_(grad_out.t(), x)
    elif main_grad.is_cuda:  # cuBLAS: bf16 operands, fp32 accumulator read and written in place
        torch.addmm(main_grad, grad_out.t(), x, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.add_(grad_out.t() @ x)
    return None


class Embedding(nn.Embedding):
    """nn.Embedding whose weight gradient goes into DDP's main_grad (see `embedding`)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[ids]; its weight gradient goes straight into weight.main_grad where there is one."""
    if getattr(weight, "main_grad", None) is None:
        return F.embedding(ids, weight)
    return EmbeddingIntoMainGrad.apply(ids, weight)


class EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        # The weight itself on ctx: under a saved-tensor hook (selective recomputation's) autograd would
        # hand back a saved parameter as a new tensor object, without its main_grad.
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        main_grad = ctx.weight.main_grad
        rows = grad_out.reshape(-1, grad_out.size(-1)).to(main_grad.dtype)
        main_grad.index_put_((ids.flatten(),), rows, accumulate=True)
        return None, None


def _cross_entropy(logits, labels):
    """(loss, log-sum-exp) per row, in fp32 (or wider)."""
    x = logits.to(compiled.accumulator(logits.dtype))
    lse = torch.logsumexp(x, dim=-1)
    return lse - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1), lse


def _cross_entropy_backward_(logits, lse, labels, grad_loss):
    """logits <- d loss / d logits = (softmax - one_hot(label)) * grad_loss; returns them."""
    x = logits.to(compiled.accumulator(logits.dtype))
    vocab = torch.arange(x.size(-1), device=x.device)
    target = (vocab == labels.unsqueeze(-1)).float()
    return logits.copy_((torch.exp(x - lse.unsqueeze(-1)) - target) * grad_loss.unsqueeze(-1))
