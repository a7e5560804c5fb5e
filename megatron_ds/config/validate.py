"""One validation pass over the whole configuration, run once at load.

Every problem is reported at once, each naming the field and what to set instead,
so a 64-node job fails on the login node rather than ten minutes into start-up.
"""

import math

from megatron_ds.config.schema import RECOMPUTE_REGIONS


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field and how to fix it."""


def _model_errors(m, p) -> list[str]:
    errors = []
    positive = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank")
    for name in (*positive, "original_seq_len"):
        if getattr(m, name) <= 0:
            errors.append(f"model.{name} must be positive (got {getattr(m, name)})")
    if m.q_lora_rank < 0:
        errors.append("model.q_lora_rank must be >= 0 (0 projects queries directly)")
    if m.qk_rope_head_dim <= 0 or m.qk_rope_head_dim % 2:
        errors.append(f"model.qk_rope_head_dim must be a positive even number (got {m.qk_rope_head_dim})")
    if not 0 <= m.n_dense_layers <= m.n_layers:
        errors.append(f"model.n_dense_layers={m.n_dense_layers} must lie in [0, model.n_layers={m.n_layers}]")
    if m.mtp_depth < 0:
        errors.append("model.mtp_depth must be >= 0 (0 switches Multi-Token Prediction off)")
    if m.n_layers > m.n_dense_layers:
        errors += _moe_errors(m)
    if m.original_seq_len > 0 and m.max_seq_len > m.original_seq_len * m.rope_factor:
        errors.append(
            f"model.max_seq_len={m.max_seq_len} exceeds what the position encoding reaches "
            f"(original_seq_len {m.original_seq_len} x rope_factor {m.rope_factor}); "
            f"raise model.rope_factor to at least {math.ceil(m.max_seq_len / m.original_seq_len)}"
        )
    if m.rope_factor < 1:
        errors.append(f"model.rope_factor must be >= 1 (got {m.rope_factor}; 1 disables YaRN)")
    if p.tensor < 1:
        return errors  # reported with the parallel section; the divisibility checks below need it >= 1
    if m.n_heads % p.tensor:
        errors.append(
            f"model.n_heads={m.n_heads} is not divisible by parallel.tensor={p.tensor}; "
            f"choose a tensor-parallel size that divides {m.n_heads}"
        )
    if m.vocab_size % p.tensor:
        errors.append(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor={p.tensor}")
    return errors


def _moe_errors(m) -> list[str]:
    errors = []
    experts, k = m.n_routed_experts, m.n_activated_experts
    if experts <= 0 or k <= 0:
        return [f"model.n_routed_experts ({experts}) and model.n_activated_experts ({k}) must be positive"]
    if m.n_expert_groups < 1 or m.n_expert_nodes < 1:
        groups, nodes = m.n_expert_groups, m.n_expert_nodes
        return [f"model.n_expert_groups ({groups}) and model.n_expert_nodes ({nodes}) must be >= 1"]
    if experts % m.n_expert_groups:
        errors.append(
            f"model.n_routed_experts={experts} is not divisible by model.n_expert_groups={m.n_expert_groups}"
        )
    if m.n_limited_groups > m.n_expert_groups or m.n_limited_groups < 1:
        errors.append(
            f"model.n_limited_groups={m.n_limited_groups} must lie in [1, model.n_expert_groups="
            f"{m.n_expert_groups}] (the groups a token may use)"
        )
    if experts % m.n_expert_nodes:
        errors.append(
            f"model.n_routed_experts={experts} is not divisible by model.n_expert_nodes={m.n_expert_nodes}"
        )
    if not 1 <= m.max_nodes_per_token <= m.n_expert_nodes:
        errors.append(
            f"model.max_nodes_per_token={m.max_nodes_per_token} must lie in [1, model.n_expert_nodes="
            f"{m.n_expert_nodes}]"
        )
    if errors:
        return errors
    reachable = min(
        m.n_limited_groups * experts // m.n_expert_groups,
        m.max_nodes_per_token * experts // m.n_expert_nodes,
    )
    if k > reachable:
        errors.append(
            f"model.n_activated_experts={k} is larger than the {reachable} experts a token can reach under "
            f"the group limit ({m.n_limited_groups} of {m.n_expert_groups} groups) and the node limit "
            f"({m.max_nodes_per_token} of {m.n_expert_nodes} nodes); lower it or raise the limits"
        )
    return errors


def _parallel_errors(cfg) -> list[str]:
    p, m = cfg.parallel, cfg.model
    errors = []
    for name in ("tensor", "pipeline", "virtual_pipeline", "expert", "gpus_per_node"):
        if getattr(p, name) < 1:
            errors.append(f"parallel.{name} must be >= 1 (got {getattr(p, name)})")
    if errors:
        return errors
    if p.virtual_pipeline > 1 and p.pipeline == 1:
        errors.append(
            f"parallel.virtual_pipeline={p.virtual_pipeline} interleaves pipeline stages, but "
            "parallel.pipeline=1; set parallel.pipeline > 1 or parallel.virtual_pipeline=1"
        )
    stages = p.pipeline * p.virtual_pipeline
    if m.n_layers > m.n_dense_layers and m.n_routed_experts % p.expert:
        errors.append(
            f"model.n_routed_experts={m.n_routed_experts} is not divisible by parallel.expert={p.expert}; "
            f"choose an expert-parallel size that divides {m.n_routed_experts}"
        )
    if p.pipeline_layers:
        if len(p.pipeline_layers) != stages:
            errors.append(
                f"parallel.pipeline_layers has {len(p.pipeline_layers)} entries but parallel.pipeline x "
                f"parallel.virtual_pipeline = {p.pipeline} x {p.virtual_pipeline} = {stages} stages; "
                "give one layer count per stage"
            )
        if any(n < 1 for n in p.pipeline_layers):
            errors.append(
                f"parallel.pipeline_layers={p.pipeline_layers} leaves a stage without layers; "
                "every stage needs at least one"
            )
        if sum(p.pipeline_layers) != m.n_layers:
            errors.append(
                f"parallel.pipeline_layers={p.pipeline_layers} sums to {sum(p.pipeline_layers)} "
                f"but model.n_layers={m.n_layers}"
            )
    elif stages > m.n_layers:
        chunks = f" x parallel.virtual_pipeline={p.virtual_pipeline}" if p.virtual_pipeline > 1 else ""
        errors.append(
            f"parallel.pipeline={p.pipeline} stages{chunks} for {m.n_layers} layers leaves a stage without "
            f"layers; use at most {m.n_layers} stages"
        )
    return errors


def _precision_errors(cfg) -> list[str]:
    pr = cfg.precision
    errors = []
    if pr.params_dtype not in ("fp32", "bf16"):
        errors.append(f"precision.params_dtype={pr.params_dtype!r}: choose fp32 or bf16")
    if pr.linear_impl not in ("local", "te"):
        errors.append(f"precision.linear_impl={pr.linear_impl!r}: choose local or te")
    if pr.fp8 not in ("none", "blockwise", "delayed", "current"):
        errors.append(f"precision.fp8={pr.fp8!r}: choose none, blockwise, delayed or current")
    elif pr.fp8 != "none" and pr.linear_impl != "te":
        errors.append(f"precision.fp8={pr.fp8} needs Transformer Engine: set precision.linear_impl=te")
    if pr.expert_gemm not in ("auto", "torch", "te"):
        errors.append(f"precision.expert_gemm={pr.expert_gemm!r}: choose auto, torch or te")
    elif pr.expert_gemm == "te" and pr.linear_impl != "te":
        errors.append("precision.expert_gemm=te needs Transformer Engine: set precision.linear_impl=te")
    elif pr.expert_gemm == "torch" and pr.fp8 != "none":
        errors.append(
            f"precision.expert_gemm=torch runs the routed experts in BF16, but precision.fp8={pr.fp8} asks "
            "for FP8 experts: set precision.expert_gemm=auto (or te)"
        )
    if pr.fp8_dispatch and pr.fp8 == "none":
        errors.append("precision.fp8_dispatch needs an FP8 recipe: set precision.fp8=blockwise")
    if cfg.train.deterministic and pr.params_dtype != "fp32":
        errors.append("train.deterministic needs precision.params_dtype=fp32")
    return errors


def _train_errors(cfg) -> list[str]:
    t, m = cfg.train, cfg.model
    errors = []
    for name in ("seq_len", "micro_batch_size", "global_batch_size", "batch_rampup_start"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name} must be >= 1 (got {getattr(t, name)})")
    if t.seq_len > m.max_seq_len:
        errors.append(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; shorten the sequence "
            "or extend the context (model.max_seq_len with a larger model.rope_factor)"
        )
    if t.batch_rampup_start > t.global_batch_size:
        errors.append(
            f"train.batch_rampup_start={t.batch_rampup_start} exceeds train.global_batch_size="
            f"{t.global_batch_size}; set it to at most the final batch"
        )
    if t.global_batch_size % t.micro_batch_size or t.batch_rampup_start % t.micro_batch_size:
        errors.append(
            f"train.global_batch_size={t.global_batch_size} and train.batch_rampup_start="
            f"{t.batch_rampup_start} must be multiples of train.micro_batch_size={t.micro_batch_size}"
        )
    if t.lr_schedule not in ("deepseek", "cosine", "wsd"):
        errors.append(f"train.lr_schedule={t.lr_schedule!r}: choose deepseek, cosine or wsd")
    if not 0 <= t.min_lr <= t.lr:
        errors.append(f"train.min_lr={t.min_lr} must lie in [0, train.lr={t.lr}]")
    if len(t.final_lrs) != len(t.final_tokens):
        errors.append("train.final_lrs and train.final_tokens must have the same length")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            errors.append(f"train.{name} must lie in [0, 1) (got {getattr(t, name)})")
    if t.steps < 0 or t.train_tokens <= 0:
        errors.append("train.steps must be >= 0 and train.train_tokens positive")
    if t.gc_interval < 0:
        errors.append(
            f"train.gc_interval must be >= 0 (got {t.gc_interval}; 0 leaves Python's collector automatic)"
        )
    unknown = sorted(set(t.recompute) - set(RECOMPUTE_REGIONS))
    if unknown:
        choices = ", ".join(RECOMPUTE_REGIONS)
        errors.append(f"train.recompute names unknown regions {unknown}: choose from {choices}")
    if t.optimizer_impl not in ("auto", "megatron", "zero1"):
        errors.append(f"train.optimizer_impl={t.optimizer_impl!r}: choose auto, megatron or zero1")
    errors += _cuda_graph_errors(cfg)
    if cfg.checkpoint.keep_last < 1:
        errors.append(f"checkpoint.keep_last must be >= 1 (got {cfg.checkpoint.keep_last})")
    return errors


def _cuda_graph_errors(cfg) -> list[str]:
    """What train.cuda_graphs cannot capture: anything that reads GPU values back to the host inside the
    step (fp32 experts' split sizes, the expert-parallel all-to-all's), keeps host-side state across it
    (delayed and current FP8 scaling's amax histories, our ZeRO-1 backend's .grad accumulation), or
    runs through a schedule of its own (pipeline parallelism). Tensor parallelism is untested."""
    p, pr, t = cfg.parallel, cfg.precision, cfg.train
    if not t.cuda_graphs:
        return []
    limits = {
        "parallel.pipeline=1": p.pipeline == 1,
        "parallel.expert=1": p.expert == 1,
        "parallel.tensor=1": p.tensor == 1,
        "precision.params_dtype=bf16": pr.params_dtype == "bf16",
        "precision.fp8=none or blockwise": pr.fp8 in ("none", "blockwise"),
        "train.optimizer_impl=megatron or auto": t.optimizer_impl != "zero1",
    }
    unmet = [setting for setting, met in limits.items() if not met]
    if not unmet:
        return []
    return [f"train.cuda_graphs=true needs {', '.join(unmet)}; set those or train.cuda_graphs=false"]


def _data_errors(cfg) -> list[str]:
    try:
        cfg.data.validate()
    except ValueError as e:
        return [str(e)]
    return []


def validate(cfg) -> None:
    errors = (
        _model_errors(cfg.model, cfg.parallel)
        + _parallel_errors(cfg)
        + _precision_errors(cfg)
        + _train_errors(cfg)
        + _data_errors(cfg)
    )
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def validate_world(cfg, world_size: int) -> int:
    """Check the layout against the actual number of ranks; returns the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
            f"{p.tensor} x {p.pipeline}; launch a multiple of {model_parallel} ranks"
        )
    dp = world_size // model_parallel
    if (p.tensor * dp) % p.expert:
        raise ConfigError(
            f"parallel.expert={p.expert} must divide tensor x data-parallel = {p.tensor * dp} ranks "
            f"(world {world_size}, pipeline {p.pipeline}); choose an expert size among the divisors"
        )
    per_step = t.micro_batch_size * dp
    for name in ("global_batch_size", "batch_rampup_start"):
        if getattr(t, name) % per_step:
            raise ConfigError(
                f"train.{name}={getattr(t, name)} is not a multiple of micro_batch_size x data-parallel "
                f"size = {t.micro_batch_size} x {dp}; set it to a multiple of {per_step}"
            )
    return dp
