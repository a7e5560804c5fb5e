"""Weight initialisation that does not depend on the parallel layout.

Every weight is drawn from a generator seeded by (seed, parameter name[, expert index]), and a
sharded parameter copies its slice of the full tensor. A TP=2 or EP=4 or pipelined model
therefore holds exactly the weights of the single-process model, which is what makes the
sharded-versus-single equivalence tests and checkpoint resharding meaningful.
"""

import re
import zlib

import torch
from torch import nn

# Attributes set by parallelisation on a parameter that holds a slice of a larger tensor:
# (dim, start, full_size) -- the local tensor is full[start : start + local] along dim -- and
# the process group over which the slices are spread (checkpointing reassembles them).
SHARD_ATTR = "mds_shard"
SHARD_GROUP_ATTR = "mds_shard_group"


# (name suffix in this model, the local backend's suffix): a parameter another backend names differently
RENAMED_ATTR = "mds_renamed"
# (expert g, experts E): the parameter is whole[g].T of the local backend's stacked [E, in, out] weight
EXPERT_SLICE_ATTR = "mds_expert_slice"
_EXPERT_INDEX = re.compile(r"#\d+")  # `<stacked>#<expert>`: how an expert slice is named


def mark_shard(param: torch.Tensor, dim: int, start: int, full_size: int, group=None) -> None:
    setattr(param, SHARD_ATTR, (dim, start, full_size))
    setattr(param, SHARD_GROUP_ATTR, group)


def copy_layout_marks(source: torch.Tensor, target: torch.Tensor) -> None:
    """`target` (an optimizer state or a range of one, or the weight of a layer that replaces source's)
    is laid out like `source`: same shard, same slice."""
    for attr in (SHARD_ATTR, SHARD_GROUP_ATTR, EXPERT_SLICE_ATTR):
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))


def stacked_name(name: str) -> str:
    """The name without expert slice indices (`...experts.w1#5.exp_avg` -> `...experts.w1.exp_avg`)."""
    return _EXPERT_INDEX.sub("", name)


def mark_renamed(param: torch.Tensor, here: str, canonical: str) -> None:
    """`param`, whose name ends in `here` in this model, goes by the local backend's name, which ends in
    `canonical` instead: initialisation and checkpoints then treat both backends alike."""
    setattr(param, RENAMED_ATTR, (here, canonical))


def mark_expert_slice(
    param: torch.Tensor, here: str, stacked: str, expert: int, n_experts: int, n_local: int
) -> None:
    """`param` ([out, in], whose name ends in `here`) is expert `expert` of the local backend's stacked
    weight `stacked` ([n_experts, in, out]), transposed; this rank holds n_local of the experts. It goes
    by `<stacked>#<expert>`; initialisation draws it as that expert's slice, and checkpoints assemble the
    slices into the stacked tensor."""
    mark_renamed(param, here, f"{stacked}#{expert}")
    setattr(param, EXPERT_SLICE_ATTR, (expert, n_experts, n_local))


def canonical_name(name: str, param: torch.Tensor) -> str:
    """The name `param` (called `name` in its model) has for initialisation and checkpoints."""
    here, canonical = getattr(param, RENAMED_ATTR, ("", ""))
    return name.removesuffix(here) + canonical if here and name.endswith(here) else name


def _generator(seed: int, name: str, index: int | None = None) -> torch.Generator:
    key = f"{seed}:{name}" if index is None else f"{seed}:{name}:{index}"
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """Norm weights to 1, every matrix to N(0, std), every buffer (balance bias, counters) to 0.

    Stacked expert weights ([experts, in, out]) draw each expert from its own seed, so a rank
    holding experts 64..127 generates only those.
    """
    for name, param in model.named_parameters():
        name = canonical_name(name, param)
        if param.dim() == 1:
            param.fill_(1.0)
            continue
        if hasattr(param, EXPERT_SLICE_ATTR):  # one expert of a stacked weight, transposed
            expert = getattr(param, EXPERT_SLICE_ATTR)[0]
            param.copy_(_normal(param.shape[::-1], std, _generator(seed, stacked_name(name), expert)).t())
            continue
        dim, start, full_size = getattr(param, SHARD_ATTR, (0, 0, param.size(0)))
        if param.dim() == 3:
            assert dim == 0, f"{name}: stacked expert weights may only be split along the expert dim"
            for e in range(param.size(0)):
                param[e].copy_(_normal(param.shape[1:], std, _generator(seed, name, start + e)))
            continue
        full_shape = list(param.shape)
        full_shape[dim] = full_size
        full = _normal(full_shape, std, _generator(seed, name))
        param.copy_(full.narrow(dim, start, param.size(dim)))
    for buffer in model.buffers():
        buffer.zero_()
