"""Multi-Token Prediction against its formula, and the pipeline cut against the uncut model."""

import pytest
import torch
import torch.nn.functional as F
from model_testing import batch, small_config

from megatron_ds.model.rope import rotary_table
from parallel.parallelize import ModelGroups, build_model


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _losses_by_formula(model, tokens, labels, loss_mask):
    """Report eqs. 21-25 written out: the main loss and, for k = 1..D,
    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], h^k = TRM_k(h'^k) (ending in its norm),
    P^k_{i+k+1} = OutHead(h^k_i), L^k = mean CE over the positions i whose target t_{i+k+1} exists
    (sequences truncated, not rolled). h^0 is the main model's final, normalised representation."""
    a = model.args
    seq = tokens.size(1)
    h = model.embed(tokens)
    rope = rotary_table(a, seq, tokens.device)
    for layer in model.layers.values():
        h = layer(h, rope, None)
    head = model.head.linear.weight

    def masked_ce(hidden, targets, mask):
        loss = F.cross_entropy((hidden @ head.T).flatten(0, 1), targets.flatten(), reduction="none")
        return (loss * mask.flatten()).sum() / mask.sum()

    h = _rms_norm(h, model.norm.weight, a.norm_eps)
    main = masked_ce(h, labels, loss_mask)
    mtp_losses = []
    for k, module in enumerate(model.mtp, start=1):
        length = seq - k  # positions i whose t_{i+k+1} = labels[i + k] exists
        embedded = model.embed.weight[labels[:, k - 1 : k - 1 + length]]  # Emb(t_{i+k}), the shared embedding
        joined = torch.cat(
            [
                _rms_norm(embedded, module.enorm.weight, a.norm_eps),
                _rms_norm(h[:, :length], module.hnorm.weight, a.norm_eps),
            ],
            dim=-1,
        )
        h = module.block(joined @ module.eh_proj.weight.T, rotary_table(a, length, tokens.device), None)
        h = _rms_norm(h, module.norm.weight, a.norm_eps)
        mtp_losses.append(masked_ce(h, labels[:, k : k + length], loss_mask[:, k : k + length]))
    return main, torch.stack(mtp_losses).mean()


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_equals_formula(depth):
    cfg = small_config(f"model.mtp_depth={depth}")
    model = build_model(cfg, groups=ModelGroups())
    tokens, labels = batch(cfg, seed=11)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    loss_mask[0, 5:9] = 0  # masked labels must drop out of the MTP losses where they are targets
    out = model(tokens, labels, loss_mask)
    with torch.no_grad():
        expected_main, expected_mtp = _losses_by_formula(model, tokens, labels, loss_mask)
    torch.testing.assert_close(out.lm_loss, expected_main, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.mtp_loss, expected_mtp, rtol=1e-5, atol=0)


def test_pipeline_cut_equals_uncut_model():
    for n_stages, layers in ((3, "[]"), (2, "[2,1]")):
        cfg = small_config(f"parallel.pipeline={n_stages}", f"parallel.pipeline_layers={layers}")
        full = build_model(small_config(), groups=ModelGroups())
        stages = [build_model(cfg, groups=ModelGroups(pipeline_rank=s)) for s in range(n_stages)]
        tokens, labels = batch(cfg, seed=13)

        expected = full(tokens, labels)
        (expected.lm_loss + cfg.train.mtp_loss_weight * expected.mtp_loss).backward()

        # Forward stage by stage, keeping each stage's input and output; then backward in reverse.
        boundary, outputs, h = [], [], tokens
        for model in stages[:-1]:
            h = model(h)
            outputs.append(h)
            h = h.detach().requires_grad_()
            boundary.append(h)
        out = stages[-1](h, labels)
        (out.lm_loss + cfg.train.mtp_loss_weight * out.mtp_loss).backward()
        for output, received in zip(reversed(outputs), reversed(boundary)):
            output.backward(received.grad)

        torch.testing.assert_close(out.lm_loss, expected.lm_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.mtp_loss, expected.mtp_loss, rtol=1e-5, atol=0)
        reference = dict(full.named_parameters())
        seen = set()
        for s, model in enumerate(stages):
            for name, param in model.named_parameters():
                assert torch.equal(param, reference[name]), (
                    f"stage {s} {name}: weights differ from the uncut model"
                )
                if name == "embed.weight":
                    continue
                assert name not in seen, f"{name} lives on two stages"
                seen.add(name)
                torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-5, atol=1e-8, msg=name)
        # The embedding lives on the first stage and, for MTP, on the last: its gradient is their sum.
        assert stages[0].embed is not None and stages[-1].embed is not None
        assert all(stage.embed is None for stage in stages[1:-1])
        embed_grad = stages[0].embed.weight.grad + stages[-1].embed.weight.grad
        torch.testing.assert_close(embed_grad, full.embed.weight.grad, rtol=1e-5, atol=1e-8)
        assert seen | {"embed.weight"} == set(reference)
