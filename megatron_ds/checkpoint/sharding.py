"""Describe this rank's tensors to `torch.distributed.checkpoint` as pieces of full tensors.

A tensor marked by parallelisation with `mds_shard = (dim, start, full_size)` over the process
group `mds_shard_group` becomes a DTensor with placement Shard(dim) on a 1-D DeviceMesh of that
group; everything else is a plain (replicated) tensor. DCP stores each piece once (replicas
on data-parallel ranks are deduplicated by its planner) under the full tensor's name and
shape, and on load copies to every rank exactly the part of the full tensor its own target
covers, so any (TP, EP, DP) layout reads any other.

A distributed optimizer (Megatron-Core's) keeps each parameter's state as a flat range of the
flattened local parameter, cut wherever its data-parallel buffers end. Such a 1-D tensor carries
`mds_flat_range = (start, stop, local_shape)`; it is described to DCP as the few boxes of the full
tensor that the range covers, so it reads and writes the same checkpoint keys as whole tensors.
"""

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megatron_ds.checkpoint.storage import CheckpointError
from megatron_ds.model.init import (
    EXPERT_SLICE_ATTR,
    SHARD_ATTR,
    SHARD_GROUP_ATTR,
    copy_layout_marks,
    stacked_name,
)

FLAT_RANGE_ATTR = "mds_flat_range"


def mark_flat_range(tensor: torch.Tensor, start: int, stop: int, of: torch.Tensor) -> None:
    """`tensor` (1-D) holds elements [start, stop) of `of` flattened; it inherits of's shard mark."""
    setattr(tensor, FLAT_RANGE_ATTR, (start, stop, tuple(of.shape)))
    copy_layout_marks(of, tensor)


def flat_range_boxes(start: int, stop: int, shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split [start, stop) of a row-major tensor of `shape` into (offsets, sizes) boxes, in order.

    Each box is a contiguous run of the flat range, so box i is flat[a_i : a_i + numel_i].
    """
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [([start], [stop - start])]
    row = math.prod(shape[1:])
    (first_row, first_col), (last_row, last_col) = divmod(start, row), divmod(stop, row)
    if first_row == last_row:  # inside one row: recurse into it
        return [([first_row, *o], [1, *s]) for o, s in flat_range_boxes(first_col, last_col, shape[1:])]
    boxes = []
    if first_col:  # a partial first row
        boxes += [([first_row, *o], [1, *s]) for o, s in flat_range_boxes(first_col, row, shape[1:])]
        first_row += 1
    if last_row > first_row:  # whole rows
        boxes.append(([first_row] + [0] * (len(shape) - 1), [last_row - first_row, *shape[1:]]))
    if last_col:  # a partial last row
        boxes += [([last_row, *o], [1, *s]) for o, s in flat_range_boxes(0, last_col, shape[1:])]
    return boxes


class MeshCache:
    """One DeviceMesh per shard group, built once in the main thread (meshes only give coordinates)."""

    def __init__(self):
        self._meshes: dict[int, tuple[object, DeviceMesh]] = {}

    def get(self, group) -> DeviceMesh:
        key = id(group)
        if key not in self._meshes:
            self._meshes[key] = (group, DeviceMesh.from_group(group, "cpu"))
        return self._meshes[key][1]


def local_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of this rank's whole shard, of which a flat-range tensor holds a part."""
    flat = getattr(tensor, FLAT_RANGE_ATTR, None)
    return torch.Size(flat[2]) if flat is not None else tensor.shape


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor this (possibly sharded) local tensor belongs to."""
    expert = getattr(tensor, EXPERT_SLICE_ATTR, None)
    if expert is not None:  # [out, in] slice of a stacked [experts, in, out]
        d_out, d_in = local_shape(tensor)
        return torch.Size([expert[1], d_in, d_out])
    shape = list(local_shape(tensor))
    shard = getattr(tensor, SHARD_ATTR, None)
    if shard is not None:
        dim, _, size = shard
        shape[dim] = size
    return torch.Size(shape)


def part_of(tensor: torch.Tensor, whole_local: torch.Tensor) -> torch.Tensor:
    """The part of `whole_local` (a tensor of this rank's shard shape) that `tensor` holds."""
    flat = getattr(tensor, FLAT_RANGE_ATTR, None)
    return whole_local if flat is None else whole_local.reshape(-1)[flat[0] : flat[1]]


def _is_split(tensor: torch.Tensor) -> bool:
    shard = getattr(tensor, SHARD_ATTR, None)
    return shard is not None and local_shape(tensor)[shard[0]] != shard[2]


def dcp_view(name: str, tensor: torch.Tensor, local: torch.Tensor, meshes: MeshCache) -> torch.Tensor:
    """Wrap `local` (the storage of `tensor`, possibly a CPU copy) for DCP according to its shard mark."""
    if hasattr(tensor, FLAT_RANGE_ATTR):
        return _flat_range_view(name, tensor, local)
    if not _is_split(tensor):
        return local
    dim, start, size = _checked_shard(name, tensor)
    mesh = meshes.get(getattr(tensor, SHARD_GROUP_ATTR))
    shape = full_shape(tensor)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape, stride=stride)


def _checked_shard(name: str, tensor: torch.Tensor) -> tuple[int, int, int]:
    """The shard mark (dim, start, full size), checked to be the rank-ordered even split DCP expects."""
    dim, start, size = getattr(tensor, SHARD_ATTR)
    local_size = local_shape(tensor)[dim]
    group = getattr(tensor, SHARD_GROUP_ATTR, None)
    if group is None or not dist.is_initialized():
        raise CheckpointError(f"{name} is a slice of size {local_size} of {size} without a shard group")
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = math.ceil(size / n)
    if start != rank * chunk or local_size != min(chunk, size - start):
        raise CheckpointError(
            f"{name}: slice [{start}:{start + local_size}] of dim {dim} on group rank {rank} of {n} "
            f"is not the rank-ordered even split of {size} that checkpointing supports"
        )
    return dim, start, size


def _flat_range_view(name: str, tensor: torch.Tensor, local: torch.Tensor) -> ShardedTensor:
    """A flat range as a ShardedTensor whose local shards are the boxes it covers (views of `local`).

    DCP plans from local shards only and merges all ranks' plans; ShardedTensor itself insists on
    metadata that tiles the whole tensor, so the rest is listed as boxes placed on another rank.
    """
    start, stop, shape = getattr(tensor, FLAT_RANGE_ATTR)
    full = full_shape(tensor)
    offset = [0] * len(shape)
    rest = []  # boxes of the full tensor outside this rank's shard
    if _is_split(tensor):
        dim, first, size = _checked_shard(name, tensor)
        offset[dim] = first
        for lo, hi in ((0, first), (first + shape[dim], size)):
            if lo < hi:
                rest.append(([lo if d == dim else 0 for d in range(len(full))],
                             [hi - lo if d == dim else n for d, n in enumerate(full)]))  # fmt: skip
    numel = math.prod(shape)
    outside_range = flat_range_boxes(0, start, shape) + flat_range_boxes(stop, numel, shape)
    rest += [([o + d for o, d in zip(offs, offset)], sizes) for offs, sizes in outside_range]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rest and world == 1:
        raise CheckpointError(f"{name}: a single process holds only [{start}:{stop}] of {numel} elements")
    shards, cursor = [], 0
    for offsets, sizes in flat_range_boxes(start, stop, shape):
        n = math.prod(sizes)
        box = local[cursor : cursor + n].view(sizes)
        shards.append(LocalShard.from_tensor_and_offsets(box, [o + d for o, d in zip(offsets, offset)], rank))
        cursor += n
    return _sharded(shards, rest, full, local)


def _sharded(shards: list, rest: list, full, like: torch.Tensor) -> ShardedTensor:
    """A ShardedTensor of this rank's `shards`; `rest`, the boxes it lacks, are listed as another rank's."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    elsewhere = f"rank:{(rank + 1) % world}/{like.device}"
    metadata = ShardedTensorMetadata(
        [s.metadata for s in shards] + [ShardMetadata(o, n, elsewhere) for o, n in rest],
        full,
        TensorProperties(dtype=like.dtype, layout=like.layout, requires_grad=False,
                         memory_format=torch.contiguous_format, pin_memory=like.is_pinned()),
    )  # fmt: skip
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata)


def _slice_boxes(tensor: torch.Tensor, local: torch.Tensor):
    """An expert slice (whole, or a flat range of it) as boxes of the stacked tensor: for each box its
    offsets there and the [out, in] view of `local` it holds; then the boxes of its expert it lacks."""
    expert = getattr(tensor, EXPERT_SLICE_ATTR)[0]
    shape = tuple(local_shape(tensor))  # [out, in]
    numel = math.prod(shape)
    start, stop = getattr(tensor, FLAT_RANGE_ATTR, (0, numel))[:2]
    flat, cursor, held = local.reshape(-1), 0, []
    for (o, i), sizes in flat_range_boxes(start, stop, shape):
        held.append(([expert, i, o], flat[cursor : cursor + math.prod(sizes)].view(sizes)))
        cursor += math.prod(sizes)
    lacking = flat_range_boxes(0, start, shape) + flat_range_boxes(stop, numel, shape)
    return held, [([expert, i, o], [1, n_in, n_out]) for (o, i), (n_out, n_in) in lacking]


def _expert_slices(key: str, parts: list, buffers: dict, copy: bool, staged: list):
    """This rank's expert slices of one stacked tensor, copied into its layout ([1, in, out] boxes,
    contiguous, as DCP requires; (slice view, box) pairs go to `staged` for the copy back after a
    load): the stacked tensor itself in a single process, else a ShardedTensor of the boxes."""
    full = full_shape(parts[0][1])
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    whole = None if distributed else _buffer(buffers, key, full, parts[0][1].dtype, False)
    shards, rest, experts = [], [], set()
    rank = dist.get_rank() if distributed else 0
    for name, tensor in parts:
        local = tensor.detach()
        pin = copy and local.is_cuda and distributed
        held, lacking = _slice_boxes(tensor, local)
        for k, (offsets, view) in enumerate(held):
            e, i, o = offsets
            n_out, n_in = view.shape
            if whole is None:
                box = _buffer(buffers, f"{name}/{k}", (1, n_in, n_out), local.dtype, pin)
                shards.append(LocalShard.from_tensor_and_offsets(box, offsets, rank))
            else:
                box = whole[e : e + 1, i : i + n_in, o : o + n_out]
            box.copy_(view.t().unsqueeze(0), non_blocking=pin)
            staged.append((view, box[0].t()))
        experts.add(getattr(tensor, EXPERT_SLICE_ATTR)[0])
        rest += lacking
    rest += [([e, 0, 0], [1, *full[1:]]) for e in range(full[0]) if e not in experts]
    if whole is not None:
        if rest:
            raise CheckpointError(f"{key}: a single process holds only some of its experts' weights")
        return whole
    return _sharded(shards, rest, full, shards[0].tensor)


def dcp_state(tensors: dict[str, torch.Tensor], meshes: MeshCache, copy: bool, buffers: dict | None = None):
    """DCP state dict for `tensors`, plus (target, staged) pairs to copy back after a load.

    With copy=True every tensor is first copied to CPU memory (a snapshot for asynchronous
    saves); otherwise CPU tensors are used in place and only device tensors are staged. Copies
    go into `buffers` (name -> tensor), reused from save to save when shape and dtype still
    match: writing into memory already touched is several times faster than fresh allocations.
    Snapshots of GPU tensors go to pinned memory, all copies in flight at once, one wait at the end.
    """
    buffers = {} if buffers is None else buffers
    state, staged, slices = {}, [], defaultdict(list)
    for name, tensor in tensors.items():
        if hasattr(tensor, EXPERT_SLICE_ATTR):  # gathered per stacked tensor below
            slices[stacked_name(name)].append((name, tensor))
            continue
        local = tensor.detach()
        if copy or local.device.type != "cpu":
            pin = copy and local.is_cuda
            local = _buffer(buffers, name, local.shape, local.dtype, pin).copy_(local, non_blocking=pin)
            staged.append((tensor, local))
        state[name] = dcp_view(name, tensor, local, meshes)
    for key, parts in slices.items():
        state[key] = _expert_slices(key, parts, buffers, copy, staged)
    if any(target.is_cuda for target, _ in staged):
        torch.cuda.synchronize()
    return state, staged


def _buffer(buffers: dict, name: str, shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """buffers[name], reallocated when its shape or dtype no longer match."""
    buffer = buffers.get(name)
    if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=pin)
    return buffer
