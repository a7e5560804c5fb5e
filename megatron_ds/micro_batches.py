"""A step's micro-batches on an unpipelined model: run eagerly, or replayed from CUDA graphs.

A small model's step is launch-bound: the GPU waits while the host launches thousands of kernels
(docs/benchmarks/h200.md). Under `train.cuda_graphs` one micro-batch's forward and backward is captured
once as a CUDA graph; every later micro-batch copies its tokens into the graph's input and replays it,
one launch for all of them.

What makes the step replayable: the configuration fixes every shape (the dispatchers pad the experts'
groups to totals the row count alone decides); nothing in the forward or backward reads a GPU value
back to the host (the experts' split offsets stay on the GPU); and whatever a step changes lives in
tensors updated in place (the weights, DDP's gradient buffers, the gates' bias and load counters).
Python values the captured kernels keep (the micro-batch count and MTP weight of the loss, and under
FP8 whether the weights are quantized in this micro-batch) key the graphs: when one changes, the step
is captured again.
"""

import traceback

import torch

from megatron_ds.config import Config, ConfigError
from megatron_ds.model.moe import balance_loss_total

EAGER_STEPS = 2  # steps run eagerly before the capture: compilation, workspaces, lazy tables


def micro_batch(model, tokens, doc_ids, n_micro: int, mtp_weight: float, context) -> torch.Tensor:
    """Forward and backward of one micro-batch (tokens: inputs and labels, one longer than the
    sequence); returns its (total, lm, mtp) losses in float64."""
    with context():  # FP8 autocast when precision.fp8 is set
        out = model(tokens[:, :-1], labels=tokens[:, 1:], doc_ids=doc_ids)
    loss = out.lm_loss + mtp_weight * out.mtp_loss
    (loss / n_micro).backward()
    return torch.stack([loss, out.lm_loss, out.mtp_loss]).detach().double()


def _inputs(batch: dict, cfg: Config, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens = batch["tokens"].to(device, non_blocking=True)
    doc_ids = batch["doc_ids"][:, :-1].to(device) if cfg.data.document_masking else None
    return tokens, doc_ids


def _step_losses(model, cfg: Config, device, batches, n_micro: int, run) -> torch.Tensor:
    """run(m, tokens, doc_ids) for each of the step's micro-batches m, which returns its (total, lm, mtp)
    losses; returns the micro-batch means of (total, lm, mtp, balance), as PipelineSchedule does."""
    losses = torch.zeros(3, device=device, dtype=torch.float64)
    for m in range(n_micro):
        losses += run(m, *_inputs(next(batches), cfg, device)) / n_micro
    balance = balance_loss_total(model, device)
    return torch.cat([losses, balance.double().view(1) / n_micro])


def forward_backward(model, cfg: Config, device, batches, n_micro: int, mtp_weight: float, context):
    """Forward and backward of one step's micro-batches, eagerly; the losses as _step_losses says."""

    def run(m: int, tokens: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        return micro_batch(model, tokens, doc_ids, n_micro, mtp_weight, context)

    return _step_losses(model, cfg, device, batches, n_micro, run)


class _Captured:
    """One captured micro-batch: its input tensors, the graph, and the losses it writes."""

    def __init__(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None):
        self.tokens, self.doc_ids = tokens.clone(), None if doc_ids is None else doc_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.losses: torch.Tensor | None = None

    def replay(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if doc_ids is not None:
            self.doc_ids.copy_(doc_ids)
        self.graph.replay()
        return self.losses


class GraphedMicroBatches:
    """forward_backward's drop-in under `train.cuda_graphs`: the first EAGER_STEPS steps run eagerly,
    then each micro-batch replays a captured graph (captured on first need, per key).

    Make it before the optimizer wraps the model in DDP: from here on the process works on the graphs'
    stream (a graph cannot be captured on the default stream), and autograd runs DDP's gradient hooks
    on the stream that was current when DDP made them; made on the default stream, the captured
    backward would have to wait on it, which a capture forbids."""

    def __init__(self, model, cfg: Config, device, context, log=print):
        self.model, self.cfg, self.device, self.context, self.log = model, cfg, device, context, log
        self.fp8 = cfg.precision.fp8 != "none"
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()  # the graphs run one after another: one memory pool
        self.steps = 0
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        torch.cuda.set_stream(self.stream)

    def __call__(self, batches, n_micro: int, mtp_weight: float) -> torch.Tensor:
        self.steps += 1
        if self.steps <= EAGER_STEPS:
            return forward_backward(
                self.model, self.cfg, self.device, batches, n_micro, mtp_weight, self.context
            )
        if any(key[:2] != (n_micro, mtp_weight) for key in self.graphs):
            self.graphs.clear()  # the loss scale or MTP weight changed: capture again

        def replay(m: int, tokens: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
            # FP8WeightCache quantizes the weights in the first micro-batch of a step of several only.
            key = (n_micro, mtp_weight, self.fp8 and n_micro > 1 and m == 0)
            if key not in self.graphs:
                self.graphs[key] = self._capture(key, tokens, doc_ids)
            return self.graphs[key].replay(tokens, doc_ids)

        return _step_losses(self.model, self.cfg, self.device, batches, n_micro, replay)

    def _capture(self, key: tuple, tokens: torch.Tensor, doc_ids: torch.Tensor | None) -> _Captured:
        n_micro, mtp_weight, _ = key
        captured = _Captured(tokens, doc_ids)
        try:
            # Thread-local: other threads' CUDA calls (NCCL's watchdog, a pinned-memory copy) stay legal.
            with torch.cuda.graph(
                captured.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                captured.losses = micro_batch(
                    self.model, captured.tokens, captured.doc_ids, n_micro, mtp_weight, self.context
                )
        except RuntimeError as e:
            cause = e  # the first failure: ending the broken capture raises its own error on top of it
            while cause.__context__ is not None:
                cause = cause.__context__
            raise ConfigError(
                "train.cuda_graphs: the micro-batch's forward and backward could not be captured as a "
                f"CUDA graph: {str(cause).splitlines()[0]} (at {_where(cause)}). The usual cause is a "
                "read of a GPU value back to the host inside the step: with FP8 experts, TE's split path "
                "does (cuBLAS older than 13.6, or experts not whole 128-blocks wide; docs/precision.md). "
                "Set train.cuda_graphs=false to run the step eagerly."
            ) from cause
        self.log(f"captured a micro-batch's forward and backward as a CUDA graph (micro-batches {n_micro}, "
                 f"MTP weight {mtp_weight}{', FP8 weights quantized' if key[2] else ''})")  # fmt: skip
        return captured


def _where(error: BaseException) -> str:
    """The innermost line of this project's code in the error's traceback (else the innermost line)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/megatron_ds/" in f.filename or "/parallel/" in f.filename]
    frame = (ours or frames or [None])[-1]
    return "unknown" if frame is None else f"{frame.filename}:{frame.lineno} {frame.line}"
