"""Our DeepSeek-V3 against Hugging Face transformers' DeepseekV3ForCausalLM, through the converter.

The model is written with save_hf (sharded safetensors + index + config.json) and read back by
`from_pretrained`, so the file format, the names and the config mapping are all under test.
"""

import json

import pytest
import torch
from model_testing import small_config

from megatron_ds.checkpoint.hf import from_hf, hf_config_dict, load_hf, model_config_from_hf, save_hf, to_hf
from megatron_ds.config import ConfigError, load_config
from megatron_ds.model.init import init_weights
from megatron_ds.model.moe import moe_gates
from megatron_ds.model.rope import rotary_table
from megatron_ds.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402

# Hugging Face has no node limit: switch ours off so both route the same way.
NO_NODE_LIMIT = ["model.n_expert_nodes=1", "model.max_nodes_per_token=1"]
CASES = {
    "q_lora+yarn": [*NO_NODE_LIMIT, "model.max_seq_len=256", "model.rope_factor=4", "model.mscale=0.7"],
    "no_q_lora+plain_rope": [*NO_NODE_LIMIT, "model.q_lora_rank=0", "model.n_dense_layers=2"],
}


def _model(args, bias_seed: int = 1) -> Transformer:
    model = Transformer(args)
    init_weights(model, seed=0, std=args.init_std)
    g = torch.Generator().manual_seed(bias_seed)
    for gate in moe_gates(model).values():
        # Small positive biases: they change choices, and all biased scores stay positive.
        gate.bias.copy_(torch.rand(gate.bias.shape, generator=g) * 0.02)
    return model.eval()


def _capture(modules, index: int) -> list:
    captured = []
    for m in modules:
        m.register_forward_hook(lambda mod, inp, out: captured.append(out[index]))
    return captured


@pytest.mark.parametrize("case", CASES)
def test_logits_and_routing_match_transformers(case, tmp_path):
    args = small_config(*CASES[case]).model
    ours = _model(args)
    save_hf(ours.state_dict(), args, tmp_path, max_shard_bytes=100_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if args.rope_factor > 1:
        rope = theirs.config.rope_parameters
        assert rope["rope_type"] == "yarn" and rope["factor"] == args.rope_factor

    our_choice = _capture(moe_gates(ours).values(), 1)
    their_choice = _capture([m for m in theirs.modules() if isinstance(m, DeepseekV3TopkRouter)], 2)
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        our_logits = ours(tokens)
        their_logits = theirs(tokens).logits
    err = (our_logits - their_logits).abs().max() / their_logits.abs().max()
    assert err < 1e-5, f"logits differ by {err:.3g} relative"
    assert len(our_choice) == len(their_choice) == args.n_moe_layers
    for mine, hf in zip(our_choice, their_choice):
        assert torch.equal(mine.sort(-1).values, hf.sort(-1).values)

    # The bias changed some choices: without it the experts chosen differ.
    for gate in moe_gates(ours).values():
        gate.bias.zero_()
    our_choice.clear()
    with torch.no_grad():
        ours(tokens)
    assert any(
        not torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(our_choice, their_choice)
    )


def test_round_trip_is_exact(tmp_path):
    args = small_config().model  # node limit on, q-LoRA, MTP
    state = _model(args).state_dict()
    hf_state = to_hf(state, args)
    mtp = f"model.layers.{args.n_layers}."
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                 "mlp.experts.15.down_proj.weight", "mlp.gate.e_score_correction_bias"):  # fmt: skip
        assert mtp + name in hf_state, name
    assert torch.equal(hf_state[mtp + "embed_tokens.weight"], state["embed.weight"])
    assert hf_state["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (args.moe_inter_dim, args.dim)

    back = from_hf(hf_state, args)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)

    save_hf(state, args, tmp_path, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_state)
    loaded_args, loaded = load_hf(tmp_path)
    assert loaded_args == model_config_from_hf(hf_config_dict(args))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_config_round_trip_and_published_config():
    args = small_config("model.rope_factor=4", "model.max_seq_len=256", *NO_NODE_LIMIT).model
    assert model_config_from_hf(hf_config_dict(args)) == args
    # The published DeepSeek-V3 config.json maps onto our 671B preset (node limit aside).
    published = transformers.DeepseekV3Config(
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ).to_dict()  # fmt: skip
    ours = model_config_from_hf(published)
    preset = load_config("deepseek-v3-671b").model
    fields = ["dim", "n_layers", "n_dense_layers", "q_lora_rank", "n_routed_experts", "n_expert_groups"]
    fields += ["n_limited_groups", "route_scale", "mtp_depth", "max_seq_len", "rope_factor", "mscale"]
    for field in fields:
        assert getattr(ours, field) == getattr(preset, field), field


def test_unsupported_hf_configs_are_refused():
    base = hf_config_dict(small_config().model)
    for change, word in (({"scoring_func": "softmax"}, "sigmoid"), ({"rope_interleave": False}, "interleave"),
                         ({"rope_scaling": {"type": "linear", "factor": 2}}, "linear")):  # fmt: skip
        with pytest.raises(ConfigError, match=word):
            model_config_from_hf({**base, **change})
    with pytest.raises(ValueError, match="FP8"):
        from_hf({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1)}, small_config().model)


def _hf_mtp_state(hf_state: dict, args) -> dict:
    """The MTP layer's weights as transformers' MtpModel names them (its checkpoint renames, by hand)."""
    prefix, state = f"model.layers.{args.n_layers}.", {}
    renames = {name: name for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight")}
    renames["shared_head.norm.weight"] = "post_norm.weight"
    for name, tensor in hf_state.items():
        inner = name.removeprefix(prefix)
        if inner == name or ".experts." in inner or inner in _MTP_SHARED:
            continue
        state["layers.0." + renames.get(inner, "mtp_block." + inner)] = tensor
    per_expert = lambda proj: torch.stack(  # noqa: E731
        [hf_state[f"{prefix}mlp.experts.{e}.{proj}.weight"] for e in range(args.n_routed_experts)]
    )
    experts = "layers.0.mtp_block.mlp.experts."
    state[experts + "gate_up_proj"] = torch.cat([per_expert("gate_proj"), per_expert("up_proj")], dim=1)
    state[experts + "down_proj"] = per_expert("down_proj")
    return state


_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


def test_mtp_layer_matches_transformers(tmp_path):
    """Our MTP module against transformers' MtpModel, from the main model's final normalised output."""
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    args = small_config(*CASES["q_lora+yarn"]).model
    ours = _model(args)
    save_hf(ours.state_dict(), args, tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    their_mtp = modeling_layers.MtpModel(theirs, 1).eval()
    missing, unexpected = their_mtp.load_state_dict(
        _hf_mtp_state(to_hf(ours.state_dict(), args), args), strict=False
    )
    assert not unexpected and all(name.startswith(("embed_tokens", "shared_head")) for name in missing), (
        missing
    )

    g = torch.Generator().manual_seed(6)
    tokens, next_tokens = torch.randint(0, args.vocab_size, (2, 2, 40), generator=g)
    with torch.no_grad():
        their_h = theirs(tokens, output_hidden_states=True).hidden_states[-1]
        their_logits = theirs.lm_head(
            their_mtp.forward_layer(0, their_h, torch.arange(40)[None], None, input_ids=next_tokens)
        )
        rope = rotary_table(args, 40, tokens.device)
        h = ours.embed(tokens)
        for layer in ours.layers.values():
            h = layer(h, rope, None)
        h = ours.norm(h)
        our_logits = ours.head(ours.mtp[0](h, ours.embed(next_tokens), rope, None))
    torch.testing.assert_close(h, their_h, rtol=1e-5, atol=1e-5)
    err = (our_logits - their_logits).abs().max() / their_logits.abs().max()
    assert err < 1e-5, f"MTP logits differ by {err:.3g} relative"
