"""Describe this rank's tensors to `torch.distributed.checkpoint` as pieces of full tensors.

A tensor marked by parallelisation with `mds_shard = (dim, start, full_size)` over the process
group `mds_shard_group` becomes a DTensor with placement Shard(dim) on a 1-D DeviceMesh of that
group; everything else is a plain (replicated) tensor. DCP stores each piece once (replicas
on data-parallel ranks are deduplicated by its planner) under the full tensor's name and
shape, and on load copies to every rank exactly the part of the full tensor its own target
covers, so any (TP, EP, DP) layout reads any other.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megatron_ds.checkpoint.storage import CheckpointError
from megatron_ds.model.init import SHARD_ATTR, SHARD_GROUP_ATTR


class MeshCache:
    """One DeviceMesh per shard group, built once in the main thread (meshes only give coordinates)."""

    def __init__(self):
        self._meshes: dict[int, tuple[object, DeviceMesh]] = {}

    def get(self, group) -> DeviceMesh:
        key = id(group)
        if key not in self._meshes:
            self._meshes[key] = (group, DeviceMesh.from_group(group, "cpu"))
        return self._meshes[key][1]


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor this (possibly sharded) local tensor belongs to."""
    shard = getattr(tensor, SHARD_ATTR, None)
    if shard is None:
        return tensor.shape
    dim, _, size = shard
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.Size(shape)


def _is_split(tensor: torch.Tensor) -> bool:
    shard = getattr(tensor, SHARD_ATTR, None)
    return shard is not None and tensor.size(shard[0]) != shard[2]


def dcp_view(name: str, tensor: torch.Tensor, local: torch.Tensor, meshes: MeshCache) -> torch.Tensor:
    """Wrap `local` (the storage of `tensor`, possibly a CPU copy) for DCP according to its shard mark."""
    if not _is_split(tensor):
        return local
    dim, start, size = getattr(tensor, SHARD_ATTR)
    group = getattr(tensor, SHARD_GROUP_ATTR, None)
    if group is None or not dist.is_initialized():
        raise CheckpointError(f"{name} is a slice {tuple(tensor.shape)} of size {size} without a shard group")
    mesh = meshes.get(group)
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = math.ceil(size / n)
    if start != rank * chunk or tensor.size(dim) != min(chunk, size - start):
        raise CheckpointError(
            f"{name}: slice [{start}:{start + tensor.size(dim)}] of dim {dim} on group rank {rank} of {n} "
            f"is not the rank-ordered even split of {size} that checkpointing supports"
        )
    shape = full_shape(tensor)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape, stride=stride)


def dcp_state(tensors: dict[str, torch.Tensor], meshes: MeshCache, copy: bool, buffers: dict | None = None):
    """DCP state dict for `tensors`, plus (target, staged) pairs to copy back after a load.

    With copy=True every tensor is first copied to CPU memory (a snapshot for asynchronous
    saves); otherwise CPU tensors are used in place and only device tensors are staged. Copies
    go into `buffers` (name -> tensor), reused from save to save when shape and dtype still
    match: writing into memory already touched is several times faster than fresh allocations.
    """
    buffers = {} if buffers is None else buffers
    state, staged = {}, []
    for name, tensor in tensors.items():
        local = tensor.detach()
        if copy or local.device.type != "cpu":
            buffer = buffers.get(name)
            if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
                buffer = buffers[name] = torch.empty(local.shape, dtype=local.dtype, device="cpu")
            local = buffer.copy_(local)
            staged.append((tensor, local))
        state[name] = dcp_view(name, tensor, local, meshes)
    return state, staged
