"""Cutting the model into pipeline stages by configuration.

A stage is the full model with the layers of other stages removed: the first stage keeps the
embedding, the last keeps the final norm, output head and MTP modules (and its own copy of the
embedding, which MTP needs; its gradient is summed with the first stage's, as in Megatron).
Parameter names are unchanged, so checkpoints do not depend on the cut.
"""

from torch import nn

from megatron_ds.model.transformer import Transformer


def stage_layer_counts(n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[int]:
    """Layers on each stage: as configured, else as even as possible (earlier stages get the extra)."""
    if layers_per_stage:
        return list(layers_per_stage)
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if s < extra else 0) for s in range(n_stages)]


def stage_layers(
    n_layers: int, n_stages: int, stage: int, layers_per_stage: list[int] | None = None
) -> range:
    counts = stage_layer_counts(n_layers, n_stages, layers_per_stage)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def cut_to_stage(
    model: Transformer, stage: int, n_stages: int, layers_per_stage: list[int] | None = None
) -> None:
    """Remove from `model` everything that stage `stage` of `n_stages` does not run."""
    if n_stages == 1:
        return
    keep = {str(i) for i in stage_layers(model.args.n_layers, n_stages, stage, layers_per_stage)}
    for key in [k for k in model.layers if k not in keep]:
        del model.layers[key]
    first, last = stage == 0, stage == n_stages - 1
    if not first and not (last and len(model.mtp)):
        model.embed = None
    if not last:
        model.norm = None
        model.head = None
        model.mtp = nn.ModuleList()
