"""Pipeline parallelism: one optimizer step's micro-batches through Megatron-Core's schedules.

`parallel.pipeline` ranks each hold a stage cut by `parallel/pipeline.py`; with
`parallel.virtual_pipeline` = v > 1 each rank holds v chunks (virtual stages r, r + pp, ... of pp x v)
and Megatron-Core runs its interleaved 1F1B schedule, which divides the pipeline bubble by v.

What this file adds to the cut model:

* `PipelineChunk`: what the schedules drive. It takes the activation received from the previous
  stage through `set_input_tensor`, and converts at the stage boundary between Megatron-Core's
  [seq, batch, hidden] p2p layout and the model's [batch, seq, hidden].
* The rank's model for everything else (optimizer, checkpoints, gradient reduction, metrics) is one
  module holding all its chunks' parameters under their usual names (`merge_chunks`).
* The last stage computes the main and MTP losses (MTP needs the embedding, so the last stage holds
  a copy of it: report section 2.2 shares it between the main model and the MTP modules). After
  backward, the first and last stages sum their embedding gradients over Megatron-Core's embedding
  group, so both copies take the same optimizer step and stay equal (as Megatron does).
* Each stage back-propagates its own layers' balance losses (`BalanceLossGrad`) and updates its own
  gates' biases from the loads summed over its data-parallel group; no loss travels between stages.

The schedules are CUDA-only (their p2p buffers are allocated on the current CUDA device).
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from megatron_ds.config import Config, ConfigError
from megatron_ds.model.moe import balance_loss_total
from megatron_ds.model.transformer import LossOutput, Transformer
from megatron_ds.optim import STAGE_COPIES_ATTR
from parallel.parallelize import DTYPES, groups_from_parallel_state


def to_sequence_major(h: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden] -> [seq, batch, hidden], contiguous, as Megatron-Core's p2p sends it."""
    return h.transpose(0, 1).contiguous()


def to_batch_major(h: torch.Tensor) -> torch.Tensor:
    """[seq, batch, hidden] (received from the previous stage) -> the model's [batch, seq, hidden]."""
    return h.transpose(0, 1)


def schedule_config(cfg: Config):
    """The Megatron-Core config its schedules read from the model chunks (`chunk.config`)."""
    from megatron.core import ModelParallelConfig

    p = cfg.parallel
    config = ModelParallelConfig(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        pipeline_dtype=DTYPES[cfg.precision.params_dtype],  # dtype of the activations sent between stages
        # Interleaving over 2 ranks sends an activation and a gradient to the same peer in one batch,
        # where they are matched by posting order and can swap (same shape, no error); unbatched p2p
        # puts the two directions on different process groups.
        batch_p2p_comm=not (p.virtual_pipeline > 1 and p.pipeline == 2),
    )
    config.hidden_size = cfg.model.dim  # the p2p tensor shape is [seq, micro-batch, hidden]
    config.fine_grained_activation_offloading = False  # read by the schedules (a TransformerConfig field)
    return config


class PipelineChunk(nn.Module):
    """One model chunk (a virtual stage) as Megatron-Core's schedules drive it.

    forward(tokens, labels, doc_ids): the first stage embeds `tokens`; later stages read the tensor
    given to `set_input_tensor`. A non-final stage returns its hidden states [seq, batch, hidden];
    the final stage returns the LossOutput (main and MTP losses).
    """

    def __init__(self, stage: Transformer, config, first: bool, last: bool):
        super().__init__()
        from megatron.core.enums import ModelType

        self.stage, self.config = stage, config
        self.model_type = ModelType.encoder_or_decoder
        self.first, self.last = first, last
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensors: list[torch.Tensor | None] | torch.Tensor | None) -> None:
        """Called by the schedule before each forward with the activation from the previous stage."""
        self.input_tensor = tensors[0] if isinstance(tensors, list) else tensors

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None):
        if self.first:
            inputs = tokens
        elif self.input_tensor is None:
            raise RuntimeError("a non-first pipeline chunk ran without set_input_tensor")
        else:
            inputs = to_batch_major(self.input_tensor)
        out = self.stage(inputs, labels=labels if self.last else None, doc_ids=doc_ids)
        return out if self.last else to_sequence_major(out)


def chunk_stage(pipeline_rank: int, chunk: int, pipeline: int) -> int:
    """The (virtual) stage index of chunk `chunk` on pipeline rank `pipeline_rank`."""
    return chunk * pipeline + pipeline_rank


def merge_chunks(chunks: list[Transformer]) -> Transformer:
    """One module holding every chunk's parameters under their usual names.

    Used by the optimizer, checkpoints, gradient reduction and metrics; the schedule runs the chunks.
    Its forward is meaningless when the chunks are not consecutive stages, and is never called.
    """
    if len(chunks) == 1:
        return chunks[0]
    merged = Transformer.__new__(Transformer)
    nn.Module.__init__(merged)
    merged.args = chunks[0].args
    merged.embed = next((c.embed for c in chunks if c.embed is not None), None)
    merged.layers = nn.ModuleDict({key: layer for c in chunks for key, layer in c.layers.items()})
    merged.norm, merged.head, merged.mtp = chunks[-1].norm, chunks[-1].head, chunks[-1].mtp
    return merged


def build_pipeline_model(cfg: Config, device: torch.device) -> tuple[Transformer, list[Transformer]]:
    """This rank's model (all its chunks' parameters, names unchanged) and its chunks in order."""
    from parallel.parallelize import build_model

    p = cfg.parallel
    groups = groups_from_parallel_state()
    if p.virtual_pipeline == 1:
        chunks = [build_model(cfg, device, groups)]
    else:  # every virtual stage is cut like a stage of a pipeline of pp x v stages
        chunk_cfg = replace(cfg, parallel=replace(p, pipeline=p.pipeline * p.virtual_pipeline))
        chunks = [
            build_model(
                chunk_cfg,
                device,
                replace(groups, pipeline_rank=chunk_stage(groups.pipeline_rank, v, p.pipeline)),
            )
            for v in range(p.virtual_pipeline)
        ]
    model = merge_chunks(chunks)
    if p.pipeline > 1 and cfg.model.mtp_depth > 0 and model.embed is not None:
        # The first and last stages hold the same embedding: count it once in the gradient norm.
        setattr(model.embed.weight, STAGE_COPIES_ATTR, 2)
    return model, chunks


def all_reduce_embedding_grads(model: Transformer, cfg: Config) -> None:
    """Sum the embedding gradients of the first and last stages (MTP's copy) over the embedding group."""
    from megatron.core import parallel_state as ps

    if cfg.parallel.pipeline == 1 or cfg.model.mtp_depth == 0 or model.embed is None:
        return
    weight = model.embed.weight
    grad = getattr(weight, "main_grad", None)  # Megatron-Core's DDP accumulates there
    if grad is None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
    dist.all_reduce(grad, group=ps.get_embedding_group())


class PipelineSchedule:
    """Runs a step's micro-batches through Megatron-Core's 1F1B (or interleaved 1F1B) schedule.

    Called as schedule(batches, n_micro, mtp_weight) like the loop's unpipelined path; returns the
    micro-batch means of (total, lm, mtp, balance) losses in float64, the same on every rank of the
    pipeline (the balance loss summed over the stages' layers).
    """

    def __init__(
        self,
        model: Transformer,
        chunks: list[Transformer],
        cfg: Config,
        device: torch.device,
        forward_context: Callable[[], AbstractContextManager] = nullcontext,
    ):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        p = cfg.parallel
        self.model, self.cfg, self.device, self.forward_context = model, cfg, device, forward_context
        self.pipeline_group = ps.get_pipeline_model_parallel_group()
        rank, size = ps.get_pipeline_model_parallel_rank(), p.pipeline
        self.last_rank = dist.get_global_rank(self.pipeline_group, size - 1)
        config = schedule_config(cfg)
        n_chunks = len(chunks)
        self.chunks = [
            PipelineChunk(
                stage,
                config,
                first=chunk_stage(rank, v, size) == 0,
                last=chunk_stage(rank, v, size) == size * n_chunks - 1,
            )
            for v, stage in enumerate(chunks)
        ]
        self.run = get_forward_backward_func(size, p.virtual_pipeline if p.virtual_pipeline > 1 else None)
        self.mtp_weight = 0.0

    def _loss(self, out: LossOutput):
        loss = out.lm_loss + self.mtp_weight * out.mtp_loss
        return loss, {"losses": torch.stack([loss, out.lm_loss, out.mtp_loss]).detach().double()}

    def _forward_step(self, data_iterator: Iterator[dict], chunk: PipelineChunk):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        doc_ids = batch["doc_ids"][:, :-1].to(self.device) if self.cfg.data.document_masking else None
        with self.forward_context():
            out = chunk(tokens[:, :-1], tokens[:, 1:], doc_ids)
        return out, self._loss

    def __call__(self, batches: Iterator[dict], n_micro: int, mtp_weight: float) -> torch.Tensor:
        p, t = self.cfg.parallel, self.cfg.train
        if p.virtual_pipeline > 1 and n_micro % p.pipeline:
            raise ConfigError(
                f"the interleaved pipeline schedule needs the micro-batches of a step ({n_micro}) to be a "
                f"multiple of parallel.pipeline={p.pipeline}: make train.global_batch_size and "
                "train.batch_rampup_start multiples of micro_batch_size x data-parallel size x pipeline"
            )
        self.mtp_weight = mtp_weight
        micro_batches = [next(batches) for _ in range(n_micro)]  # every stage reads the same ones
        outputs = self.run(
            forward_step_func=self._forward_step,
            data_iterator=[iter(micro_batches) for _ in self.chunks],
            model=self.chunks,
            num_microbatches=n_micro,
            seq_length=t.seq_len,
            micro_batch_size=t.micro_batch_size,
        )
        all_reduce_embedding_grads(self.model, self.cfg)
        losses = torch.zeros(4, dtype=torch.float64, device=self.device)
        if outputs:  # the last stage: one record per micro-batch
            losses[:3] = torch.stack([o["losses"] for o in outputs]).to(self.device).mean(0)
        dist.broadcast(losses, src=self.last_rank, group=self.pipeline_group)
        balance = balance_loss_total(self.model, self.device).double().view(1) / n_micro
        dist.all_reduce(balance, group=self.pipeline_group)  # each stage holds its own layers' share
        losses[3] = balance[0]
        return losses
