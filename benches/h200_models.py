"""The two systems the H200 benchmarks compare, built for one GPU with the same shapes.

- ours: megatron_ds's Transformer (local or TE backend), initialised N(0, init_std) on the GPU
  (megatron_ds.model.init draws on the CPU, which takes minutes at 5B parameters; the values do not
  change the speed);
- mcore: Megatron-Core 0.16.1's own GPTModel from its TE layer specs (MLA, MoE with TE grouped GEMM
  and fused permutation, MTP 1, sigmoid group-limited routing with expert bias, sequence balance loss).

The train-step benchmark gives both the same optimizer, Megatron-Core's DDP + distributed optimizer
(parallel.megatron_optimizer), so the optimizer's work is identical by construction; the FP8 accuracy
benchmark trains ours with megatron_ds.optim's ZeroAdamW.
"""

import os

import torch
import torch.nn.functional as F

from megatron_ds.config import load_config
from megatron_ds.precision import forward_context, transformer_engine_available


def init_single_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)


def bench_config(
    preset: str, micro_batch: int, fp8: str, linear_impl: str = "te", seq_len: int = 4096, overrides=()
):
    return load_config(
        preset,
        overrides=[
            f"precision.linear_impl={linear_impl}",
            f"precision.fp8={fp8}",
            f"train.micro_batch_size={micro_batch}",
            f"train.seq_len={seq_len}",
            *overrides,
        ],
    )


@torch.no_grad()
def _gpu_init(model: torch.nn.Module, std: float) -> None:
    for p in model.parameters():
        p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, std)
    for b in model.buffers():
        b.zero_()


def build_ours(cfg) -> torch.nn.Module:
    """parallel.parallelize.build_model's model on this GPU (TE layers, recomputation and all), its
    weights drawn N(0, init_std) here instead of by the layout-independent init."""
    from parallel.parallelize import ModelGroups, build_model

    model = build_model(cfg, "cuda", ModelGroups(), initialize=False)
    _gpu_init(model, cfg.model.init_std)
    return model


def ours_loss(model, cfg, tokens: torch.Tensor) -> torch.Tensor:
    with forward_context(cfg):
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
    return out.lm_loss + cfg.train.mtp_loss_weight * out.mtp_loss


def build_mcore(cfg) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(cfg.train.seed)
    config = mcore_config(cfg)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=True)
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=True)
    with torch.device("cuda"):
        model = GPTModel(
            config, block, vocab_size=cfg.model.vocab_size, max_sequence_length=cfg.train.seq_len,
            position_embedding_type="rope", rotary_base=int(cfg.model.rope_theta),
            share_embeddings_and_output_weights=False, mtp_block_spec=mtp,
        )  # fmt: skip
    return model.cuda()


def mcore_config(cfg):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    m, fp8 = cfg.model, cfg.precision.fp8
    return MLATransformerConfig(
        num_layers=m.n_layers, hidden_size=m.dim, ffn_hidden_size=m.inter_dim, num_attention_heads=m.n_heads,
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_nope_head_dim,
        qk_pos_emb_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, rope_type="rope",
        rotary_base=m.rope_theta, normalization="RMSNorm", layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16, init_method_std=m.init_std,
        use_cpu_initialization=False, gradient_accumulation_fusion=False,
        num_moe_experts=m.n_routed_experts,
        moe_layer_freq=[0] * m.n_dense_layers + [1] * (m.n_layers - m.n_dense_layers),
        moe_ffn_hidden_size=m.moe_inter_dim,
        moe_shared_expert_intermediate_size=m.n_shared_experts * m.moe_inter_dim,
        moe_router_topk=m.n_activated_experts, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=cfg.train.bias_update_speed,
        moe_router_num_groups=m.n_expert_groups, moe_router_group_topk=m.n_limited_groups,
        moe_router_topk_scaling_factor=m.route_scale, moe_router_dtype="fp32",
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=m.balance_loss_alpha,
        moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=transformer_engine_available(),
        mtp_num_layers=m.mtp_depth, mtp_loss_scaling_factor=cfg.train.mtp_loss_weight,
        fp8="e4m3" if fp8 != "none" else None,
        fp8_recipe={"none": "delayed", "current": "tensorwise"}.get(fp8, fp8),
    )  # fmt: skip


def mcore_loss(model, cfg, tokens: torch.Tensor) -> torch.Tensor:
    """One micro-batch that starts an optimizer step (as every micro-batch of these benchmarks does)."""
    # Megatron-Core's TE layers quantize their weights to FP8 in the first micro-batch of a step and
    # reuse that copy until told a new step began, which only its pipeline schedules do. Without this
    # it would skip the quantization, and train on stale weights, from the second step on.
    model.set_is_first_microbatch()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)
    # Megatron-Core enters te.autocast itself (config.fp8) around its transformer block.
    token_loss = model(inputs, positions, None, labels=labels)  # the MTP loss joins in backward
    return token_loss.float().mean()
