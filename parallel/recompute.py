"""Selective recomputation (report section 3.2.3), applied to a built model from outside.

DeepSeek-V3 trains without tensor parallelism partly by not keeping what is cheap to recompute:
every RMSNorm and the MLA up-projections are re-run in the backward pass, and the SwiGLU's output is
recomputed from its cached inputs (section 3.3.4). `train.recompute` names the regions:

  norm         every RMSNorm's output: the GEMMs (and the router) that read it would keep it for their
               weight gradients; here each of them keeps a recipe instead (NormOutputs), and the
               backward recomputes the output once, from the norm's input that the norm keeps anyway
  mla_up_proj  q_norm + W^UQ/W^QR and kv_norm + W^UK/W^UV: only the latents c^Q, c^KV are kept. Under
               TE each pair is one te.LayerNormLinear (wq_b, wkv_b) and q_norm, kv_norm are identities,
               so `norm` is left with the block, final and MTP norms
  swiglu       SwiGLU + the down projection, in dense FFNs, shared and routed experts: only the gate
               and up projections' outputs are kept

mla_up_proj and swiglu run under a non-reentrant checkpoint, which keeps only the region's inputs and
replays it when the backward reaches it: torch's under the local backend and Transformer Engine's under
the TE backend. The replay runs in the backward, outside the forward's te.autocast: torch's checkpoint
would replay the FP8 GEMMs in BF16, while TE's re-enters the autocast with the forward's recipe (and,
for delayed scaling, its scales). Under TE the regions do not nest, which TE's checkpoint assumes (its
in-region flag is a global that an inner region's exit clears). A norm is never in FP8: its replay is
the forward's own kernel on the same input, so it gives the same bits.

The regions are side-effect free (no routing statistics, no communication), so replaying them
changes no model state; gradients are identical to a run without recomputation. (TE's replay does
touch TE's own delayed-scaling state: docs/training.md.)
"""

import weakref
from functools import partial

import torch
from torch import nn

from megatron_ds.config import Config
from megatron_ds.config.schema import RECOMPUTE_REGIONS
from megatron_ds.model.attention import MLA
from megatron_ds.model.moe import GroupedExperts
from megatron_ds.model.norm import MLP, RMSNorm
from parallel.transformer_engine import TEGroupedExperts

# The regions replayed under a checkpoint: the methods that run them. `norm` is NormOutputs.
CHECKPOINTED = {
    "mla_up_proj": ((MLA, "q_up"), (MLA, "kv_up")),
    "swiglu": ((MLP, "down"), (GroupedExperts, "down"), (TEGroupedExperts, "down")),
}
REGIONS = ("norm", *CHECKPOINTED)
assert REGIONS == RECOMPUTE_REGIONS


def apply_recompute(model: nn.Module, cfg: Config) -> None:
    """Replay the regions named in train.recompute (of REGIONS) in the backward instead of keeping
    their activations: the norms' outputs through NormOutputs, the other regions through the checkpoint
    of the model's backend (precision.linear_impl)."""
    if cfg.precision.linear_impl == "te":
        from transformer_engine.pytorch import checkpoint
    else:
        from torch.utils.checkpoint import checkpoint
    targets = [target for name in cfg.train.recompute for target in CHECKPOINTED.get(name, ())]
    for module in model.modules():
        for cls, method in targets:
            if isinstance(module, cls):
                setattr(module, method, partial(checkpoint, getattr(module, method), use_reentrant=False))
    if "norm" in cfg.train.recompute:
        NormOutputs().apply(model)


class NormOutputs:
    """The norms' outputs, kept for the backward as recipes rather than tensors.

    Each RMSNorm registers its output as it runs. While a module that calls norms runs its forward,
    every tensor that autograd saves and that is (a view of) a registered output is packed as the
    norm, its input and the view; the first reader's backward recomputes the output, and the others
    share it. Saved-tensor hooks that were active outside (bytes_kept_for_backward's) still see every
    other tensor.
    """

    def __init__(self):
        self._outputs: dict[int, tuple[weakref.ref, _NormReplay]] = {}  # by storage address
        self._in_forward = False  # inside the outermost packing module's forward

    def apply(self, model: nn.Module) -> None:
        for module in list(model.modules()):
            if isinstance(module, RMSNorm):
                module.forward = partial(self._register, module.forward)
            if any(isinstance(child, RMSNorm) for child in module.children()):
                module.forward = partial(self._packing, module.forward)

    def _register(self, forward, x: torch.Tensor) -> torch.Tensor:
        y = forward(x)
        # Only in a forward: a checkpoint's replay in the backward runs norms too, and must not pin them.
        if self._in_forward and y.requires_grad and y.is_contiguous() and y.numel():
            self._outputs[_storage_address(y)] = (weakref.ref(y), _NormReplay(forward, x))
        return y

    def _packing(self, forward, *args, **kwargs):
        if self._in_forward:  # inside the forward of an enclosing module that packs already
            return forward(*args, **kwargs)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer_pack, outer_unpack = outer or (lambda t: t, lambda t: t)

        def pack(t: torch.Tensor):
            ref, replay = self._outputs.get(_storage_address(t), (None, None))
            y = ref() if ref is not None else None
            if y is None or t.dtype != y.dtype:
                return outer_pack(t)
            return _PackedView(replay, t.size(), t.stride(), t.storage_offset())

        def unpack(packed):
            return packed.value() if isinstance(packed, _PackedView) else outer_unpack(packed)

        self._in_forward = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return forward(*args, **kwargs)
        finally:
            self._in_forward = False
            self._outputs.clear()


def _storage_address(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage (TE's FP8 data)
        return None


class _NormReplay:
    """A norm and its input; its output, recomputed once when the backward first asks."""

    def __init__(self, forward, x: torch.Tensor):
        self.forward, self.x, self.output = forward, x, None

    def value(self) -> torch.Tensor:
        if self.output is None:
            with torch.no_grad():
                self.output = self.forward(self.x)
        return self.output


class _PackedView:
    def __init__(self, replay: _NormReplay, size, stride, offset: int):
        self.replay, self.size, self.stride, self.offset = replay, size, stride, offset

    def value(self) -> torch.Tensor:
        return self.replay.value().as_strided(self.size, self.stride, self.offset)


def bytes_kept_for_backward(forward, parameters) -> int:
    """Run forward() and return the bytes of the distinct activation storages autograd keeps for the
    backward (the parameters' own storages, which autograd also references, are not counted).

    It sees what goes through save_for_backward, as torch's checkpoint keeps a region's inputs. TE's
    checkpoint keeps them in a closure instead, which this cannot see: there, measure the CUDA allocator.
    """
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward()
    return sum(storages.values())
