"""Conversion to and from Hugging Face's DeepSeek-V3 checkpoint layout.

The names are those of the published deepseek-ai/DeepSeek-V3 checkpoint, which `transformers`'
`DeepseekV3ForCausalLM` loads: one tensor per routed expert (`mlp.experts.{e}.gate_proj.weight`,
stored [out, in] like every nn.Linear), the balance bias as `mlp.gate.e_score_correction_bias`,
and MTP module k as the extra decoder layer `model.layers.{n_layers + k}` with its own
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and copies of the shared `embed_tokens` and
`shared_head.head`. Our decoupled-RoPE weights already use DeepSeek's interleaved pair layout,
which is Hugging Face's `rope_interleave=True`, so no tensor is permuted.

Our node-limited routing has no Hugging Face counterpart: a config with the node limit active
exports routing that Hugging Face reproduces only when the node limit coincides with the group
limit (as in DeepSeek-V3, where 8 groups are the 8 nodes); importing switches the node limit off.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_ds.config import ConfigError, ModelConfig

# Our name inside a block -> Hugging Face's name inside `model.layers.{i}`.
_ATTENTION = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
}
_SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_FFN = {
    **{f"ffn.{ours}.weight": f"mlp.{theirs}.weight" for ours, theirs in _SWIGLU.items()},
    **{
        f"ffn.shared_experts.{ours}.weight": f"mlp.shared_experts.{theirs}.weight"
        for ours, theirs in _SWIGLU.items()
    },
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
}
_BLOCK = {**_ATTENTION, **_FFN}
_BLOCK_INVERSE = {theirs: ours for ours, theirs in _BLOCK.items()}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight"}  # fmt: skip
_MTP_INVERSE = {theirs: ours for ours, theirs in _MTP.items()}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.linear.weight": "lm_head.weight"}  # fmt: skip
_TOP_INVERSE = {theirs: ours for ours, theirs in _TOP.items()}
_MTP_SHARED_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.linear.weight"}


def _block_to_hf(name: str, tensor: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    if name in _BLOCK:
        return {prefix + _BLOCK[name]: tensor}
    match = re.fullmatch(r"ffn\.experts\.(w[123])", name)
    if match is None:
        raise KeyError(f"no Hugging Face name for block parameter '{name}'")
    proj = _SWIGLU[match.group(1)]
    # Ours is [experts, in, out] for x @ w; Hugging Face stores each expert as nn.Linear [out, in].
    return {f"{prefix}mlp.experts.{e}.{proj}.weight": w.t().contiguous() for e, w in enumerate(tensor)}


def to_hf(state_dict: dict[str, torch.Tensor], args: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full (unsharded) state dict -> Hugging Face DeepSeek-V3 names."""
    out = {}
    for name, tensor in state_dict.items():
        if name in _TOP:
            out[_TOP[name]] = tensor
        elif match := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            out.update(_block_to_hf(match.group(2), tensor, f"model.layers.{match.group(1)}."))
        elif match := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
            prefix = f"model.layers.{args.n_layers + int(match.group(1))}."
            inner = match.group(2)
            if inner in _MTP:
                out[prefix + _MTP[inner]] = tensor
            elif inner.startswith("block."):
                out.update(_block_to_hf(inner.removeprefix("block."), tensor, prefix))
            else:
                raise KeyError(f"no Hugging Face name for MTP parameter '{name}'")
        else:
            raise KeyError(f"no Hugging Face name for parameter '{name}'")
    for k in range(args.mtp_depth):
        prefix = f"model.layers.{args.n_layers + k}."
        for theirs, ours in _MTP_SHARED_COPIES.items():
            out[prefix + theirs] = state_dict[ours]
    return out


def from_hf(hf_state: dict[str, torch.Tensor], args: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face DeepSeek-V3 names -> our state dict; the MTP copies of embedding and head are dropped."""
    if any(name.endswith("weight_scale_inv") for name in hf_state):
        raise ValueError("FP8 checkpoint (weight_scale_inv present): dequantize it to bf16 before converting")
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in hf_state.items():
        if name in _TOP_INVERSE:
            out[_TOP_INVERSE[name]] = tensor
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None:
            raise KeyError(f"unexpected Hugging Face parameter '{name}'")
        layer, inner = int(match.group(1)), match.group(2)
        is_mtp = layer >= args.n_layers
        if is_mtp and layer - args.n_layers >= args.mtp_depth:
            raise KeyError(f"'{name}' lies beyond the {args.mtp_depth} MTP layer(s) of the configuration")
        prefix = f"mtp.{layer - args.n_layers}." if is_mtp else f"layers.{layer}."
        block_prefix = prefix + "block." if is_mtp else prefix
        if is_mtp and inner in _MTP_SHARED_COPIES:
            continue
        if is_mtp and inner in _MTP_INVERSE:
            out[prefix + _MTP_INVERSE[inner]] = tensor
        elif inner in _BLOCK_INVERSE:
            out[block_prefix + _BLOCK_INVERSE[inner]] = tensor
        elif m := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", inner):
            ours = {theirs: w for w, theirs in _SWIGLU.items()}[m.group(2)]
            experts.setdefault((block_prefix, ours), {})[int(m.group(1))] = tensor
        else:
            raise KeyError(f"unexpected Hugging Face parameter '{name}'")
    for (prefix, w), per_expert in experts.items():
        if sorted(per_expert) != list(range(args.n_routed_experts)):
            raise KeyError(f"{prefix}ffn.experts.{w}: expected experts 0..{args.n_routed_experts - 1}")
        out[f"{prefix}ffn.experts.{w}"] = torch.stack([per_expert[e].t() for e in range(len(per_expert))])
    return out


def hf_config_dict(args: ModelConfig) -> dict:
    """config.json for `DeepseekV3ForCausalLM`, in the published checkpoint's form (rope_scaling for YaRN)."""
    rope_scaling = None
    if args.rope_factor > 1:
        rope_scaling = {
            "type": "yarn",
            "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            # Our mscale sharpens the softmax (HF's mscale_all_dim); equal values leave cos/sin unscaled.
            "mscale": args.mscale,
            "mscale_all_dim": args.mscale,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "routed_scaling_factor": args.route_scale,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "seq_aux": True,
        "aux_loss_alpha": args.balance_loss_alpha,
        "num_nextn_predict_layers": args.mtp_depth,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "rms_norm_eps": args.norm_eps,
        "initializer_range": args.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    """A Hugging Face DeepSeek-V3 config.json (dict) -> our ModelConfig (node limit off)."""
    if config.get("scoring_func", "sigmoid") != "sigmoid" or not config.get("norm_topk_prob", True):
        raise ConfigError(
            "only sigmoid scoring with normalised top-k weights (DeepSeek-V3 routing) is supported"
        )
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias", False):
        raise ConfigError("only SwiGLU FFNs and bias-free attention (DeepSeek-V3) are supported")
    if not config.get("rope_interleave", True):
        raise ConfigError("rope_interleave=false checkpoints need their RoPE weights permuted; not supported")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type '{rope_type}' is not supported; DeepSeek-V3 uses yarn")
    yarn = rope_type == "yarn"
    max_seq_len = config["max_position_embeddings"]
    mscale = rope.get("mscale_all_dim", rope.get("mscale", 1.0)) if yarn else 1.0
    if yarn and rope.get("mscale", mscale) != mscale:
        raise ConfigError("yarn with mscale != mscale_all_dim (scaled cos/sin) is not supported")
    return ModelConfig(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        inter_dim=config["intermediate_size"],
        moe_inter_dim=config["moe_intermediate_size"],
        n_layers=config["num_hidden_layers"],
        n_dense_layers=config.get("first_k_dense_replace", 0),
        n_heads=config["num_attention_heads"],
        q_lora_rank=config.get("q_lora_rank") or 0,
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        n_routed_experts=config["n_routed_experts"],
        n_shared_experts=config.get("n_shared_experts") or 0,
        n_activated_experts=config["num_experts_per_tok"],
        n_expert_groups=config.get("n_group") or 1,
        n_limited_groups=config.get("topk_group") or 1,
        n_expert_nodes=1,
        max_nodes_per_token=1,
        route_scale=config.get("routed_scaling_factor", 1.0),
        balance_loss_alpha=config.get("aux_loss_alpha", ModelConfig.balance_loss_alpha),
        mtp_depth=config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0)),
        max_seq_len=max_seq_len,
        original_seq_len=rope["original_max_position_embeddings"] if yarn else max_seq_len,
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_factor=rope["factor"] if yarn else 1.0,
        beta_fast=rope.get("beta_fast", 32) if yarn else ModelConfig.beta_fast,
        beta_slow=rope.get("beta_slow", 1) if yarn else ModelConfig.beta_slow,
        mscale=mscale,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        init_std=config.get("initializer_range", ModelConfig.init_std),
    )


def save_hf(
    state_dict: dict[str, torch.Tensor],
    args: ModelConfig,
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write config.json, model-0000i-of-0000n.safetensors shards and model.safetensors.index.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf(state_dict, args)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in hf_state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        # Shared storage (the MTP copies of embedding and head) must be separate tensors in safetensors.
        shards[-1][name] = tensor.detach().cpu().contiguous().clone()
        shard_bytes += size
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(args), indent=2) + "\n")
    return out_dir


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face DeepSeek-V3 directory (sharded or single-file) into our config and state dict."""
    path = Path(path)
    args = model_config_from_hf(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    hf_state = {}
    for filename in files:
        hf_state.update(load_file(str(path / filename)))
    return args, from_hf(hf_state, args)
