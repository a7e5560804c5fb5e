"""Atomic, resharding distributed checkpoints of a flat dict of tensors, through torch.distributed.checkpoint.

Layout of RUN_DIR/checkpoints:

    step_00001000/      .metadata + __<rank>_0.distcp (DCP) and state.json (`extra`, the step)
    step_00002000/
    latest              the name of the newest complete checkpoint

A save writes into `.tmp-step_XXXXXXXX`, renames it to `step_XXXXXXXX` once every rank has
written and DCP's metadata is in place, and only then replaces `latest` (a temporary file and
os.replace). A process killed at any point leaves `latest` naming the previous, complete
checkpoint. Checkpoint traffic runs on its own gloo process groups, so an asynchronous save's
background thread never interleaves with the training loop's collectives.
"""

import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from megatron_ds.checkpoint.sharding import MeshCache, dcp_state, full_shape, part_of
from megatron_ds.checkpoint.storage import (
    METADATA_FILE,
    CheckpointError,
    SafeFileSystemReader,
    check_files,
    read_metadata,
)
from megatron_ds.config import CheckpointConfig
from megatron_ds.model.init import canonical_name, stacked_name

LATEST = "latest"
STATE_FILE = "state.json"
FORMAT = "megatron-ds-checkpoint/1"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_EARLIER = "Load an earlier checkpoint with checkpoint.load=PATH (a step_* directory)."


EXTRA_STATE_SUFFIX = "_extra_state"  # torch's state-dict key for nn.Module.get_extra_state()


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (as Parameter objects, with their shard marks) and persistent buffers as "model.<name>",
    each under the local backend's name (model.init.canonical_name; expert slices as `<stacked>#<e>`).

    Modules' extra state is left out: Transformer Engine returns a fresh tensor there (its FP8 scaling
    history, empty for the blockwise and current recipes), which an in-place load could not restore.
    """
    state = model.state_dict(keep_vars=True)
    return {
        f"model.{canonical_name(n, t)}": t
        for n, t in state.items()
        if isinstance(t, torch.Tensor) and not n.endswith(EXTRA_STATE_SUFFIX)
    }


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def follow_latest(directory: Path) -> Path | None:
    """The checkpoint `directory/latest` names; None without a pointer; CheckpointError if it dangles."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    target = Path(directory) / name
    if not _STEP_DIR.match(name) or not (target / STATE_FILE).is_file():
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a complete checkpoint in {directory}. "
            f"Point it at an existing step_* directory or {_EARLIER}"
        )
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step_* directory, a checkpoints folder with `latest`, or a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Pass a step_* directory, a checkpoints folder with a "
            "`latest` file, or a run directory."
        )
    if (path / STATE_FILE).exists() or (path / METADATA_FILE).exists():
        return path
    for folder in (path, path / "checkpoints"):
        target = follow_latest(folder)
        if target is not None:
            return target
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither {STATE_FILE} nor {METADATA_FILE} nor a `latest` "
        f"pointer (an interrupted save leaves only .tmp-* directories). {_EARLIER}"
    )


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {STATE_FILE}. {_EARLIER}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is damaged ({e}). {_EARLIER}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not a {FORMAT} file")
    return state


def config_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """'model.dim: checkpoint 128, this run 256' for every field that differs."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            lines.append(f"{prefix}.{key}: checkpoint {a!r}, this run {b!r}")
    return lines


@torch.no_grad()
def _masters_from_model(tensors: dict[str, torch.Tensor]) -> None:
    """A fresh optimizer's master weights were taken from the parameters before they were loaded."""
    for key, master in tensors.items():
        if key.startswith("optim.") and key.endswith(".master"):
            param = tensors.get("model." + key.removeprefix("optim.").removesuffix(".master"))
            if param is not None:
                master.copy_(part_of(master, param))


class Checkpointer:
    """Save, find and load the run's checkpoints. Every rank constructs one and calls every method."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory)
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        # Two gloo groups of all ranks: one for the writes (possibly in a background thread), one for
        # the main thread's decisions, so neither shares a communicator with training or the other.
        self._io_group = dist.new_group(backend="gloo") if self.distributed else None
        self._control_group = dist.new_group(backend="gloo") if self.distributed else None
        self._meshes = MeshCache()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self._staging: dict[str, torch.Tensor] = {}  # CPU snapshot buffers of asynchronous saves
        self._last_save_time = time.monotonic()
        self._last_step: int | None = None
        self.last_blocking_seconds = 0.0  # how long the last save() held up the caller
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{TMP_PREFIX}*"):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        self._barrier(self._control_group)

    def _barrier(self, group) -> None:
        if self.distributed:
            dist.barrier(group=group)

    def due(self, step: int) -> bool:
        """Whether to save `step`: every save_interval_steps, or save_interval_minutes after the last save."""
        if step == self._last_step:
            return False
        by_steps = self.cfg.save_interval_steps > 0 and step % self.cfg.save_interval_steps == 0
        if by_steps or self.cfg.save_interval_minutes <= 0:
            return by_steps
        elapsed = time.monotonic() - self._last_save_time >= 60 * self.cfg.save_interval_minutes
        flag = torch.tensor([int(elapsed)])
        if self.distributed:  # clocks drift between ranks: rank 0 decides for all
            dist.broadcast(flag, src=0, group=self._control_group)
        return bool(flag.item())

    def save(self, step: int, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        """Write checkpoint `step`; with checkpoint.async_save, return once a CPU snapshot is taken."""
        self.wait()
        if step == self._last_step:
            return
        start = time.perf_counter()
        extra_text = json.dumps(
            {"format": FORMAT, "step": step, "world_size": dist.get_world_size() if self.distributed else 1,
             "extra": extra}, indent=1,
        )  # fmt: skip
        state, _ = dcp_state(tensors, self._meshes, copy=self.cfg.async_save, buffers=self._staging)
        self._last_step, self._last_save_time = step, time.monotonic()
        if self.cfg.async_save:
            self._pending = self._executor.submit(self._write, step, state, extra_text)
        else:
            self._write(step, state, extra_text)
        self.last_blocking_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Block until an asynchronous save has been committed; re-raise its error, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, step: int, state: dict, state_text: str) -> None:
        name = checkpoint_name(step)
        tmp, final = self.directory / f"{TMP_PREFIX}{name}", self.directory / name
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        dcp.save(state, storage_writer=writer, process_group=self._io_group, no_dist=not self.distributed)
        error = None
        if self.rank == 0:  # DCP's coordinator has written .metadata: every rank's data is on disk
            try:
                self._commit(tmp, final, state_text)
            except OSError as e:
                error = e
        failed = torch.tensor([int(error is not None)])
        if self.distributed:  # every rank learns whether the checkpoint was committed
            dist.all_reduce(failed, group=self._io_group)
        if error is not None:
            raise CheckpointError(f"could not commit checkpoint {final}: {error}") from error
        if failed.item():
            raise CheckpointError(f"rank 0 could not commit checkpoint {final} (see its log)")

    def _commit(self, tmp: Path, final: Path, state_text: str) -> None:
        _write_atomic(tmp / STATE_FILE, state_text)
        old = self.directory / f"{TMP_PREFIX}old-{final.name}"
        if final.exists():  # the same step saved again after resuming from an earlier one
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(self.directory)
        _write_atomic(self.directory / LATEST, final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest keep_last checkpoints (and always the one `latest` names)."""
        if self.cfg.keep_last <= 0:
            return
        steps = sorted(
            (int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))
        )
        latest = (self.directory / LATEST).read_text().strip()
        for _, path in steps[: -self.cfg.keep_last]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        """The checkpoint `latest` points to, or None when this run has none yet."""
        return follow_latest(self.directory)

    def load(self, path: str | Path, tensors: dict[str, torch.Tensor], config_dict: dict | None) -> dict:
        """Load checkpoint `path` in place into `tensors` (any parallel layout); return its `extra`.

        Optimizer tensors ("optim.*") may be absent from the checkpoint as a whole (one made by
        `mds import-hf`): the optimizer then starts fresh, its moments untouched and its fp32
        master weights ("optim.<name>.master") copied from the loaded parameters.
        """
        self.wait()
        path = resolve_checkpoint(path)
        state = read_state(path)
        extra = state["extra"]
        if config_dict is not None and "config" in extra:
            diffs = config_differences(extra["config"].get("model", {}), config_dict.get("model", {}))
            if diffs:
                raise CheckpointError(
                    f"checkpoint {path} was saved for a different model:\n  " + "\n  ".join(diffs)
                    + "\nUse the checkpoint's model settings or start without it."
                )  # fmt: skip
        metadata = read_metadata(path / METADATA_FILE)
        check_files(path, metadata)
        wanted, problem = self._select(path, tensors, metadata.state_dict_metadata)
        self._agree_on(problem)
        dcp_tensors, staged = dcp_state(wanted, self._meshes, copy=False)
        try:
            dcp.load(
                dcp_tensors,
                storage_reader=SafeFileSystemReader(path),
                process_group=self._io_group,
                no_dist=not self.distributed,
            )
        except Exception as e:
            raise CheckpointError(f"reading checkpoint {path} failed: {e}\n{_EARLIER}") from e
        with torch.no_grad():
            for target, local in staged:
                target.copy_(local)
            if not any(k.startswith("optim.") for k in metadata.state_dict_metadata):
                _masters_from_model(tensors)
        return extra

    @staticmethod
    def _select(path: Path, tensors: dict, stored: dict) -> tuple[dict, str]:
        """The tensors to read, and a description of what does not fit (empty if all is well)."""
        has_optimizer = any(k.startswith("optim.") for k in stored)
        wanted, missing, wrong = {}, [], []
        for key, tensor in tensors.items():
            stored_key = stacked_name(key)  # expert slices are read from their stacked tensor
            saved = stored.get(stored_key)
            if saved is None:
                if has_optimizer or not key.startswith("optim."):
                    missing.append(stored_key)
                continue
            if tuple(full_shape(tensor)) != tuple(saved.size):
                wrong.append(
                    f"{stored_key}: checkpoint {tuple(saved.size)}, model {tuple(full_shape(tensor))}"
                )
            wanted[key] = tensor
        problem = ""
        if missing:
            problem += f"checkpoint {path} lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}. "
        if wrong:
            problem += f"checkpoint {path} has other shapes: {'; '.join(wrong[:5])}. "
        return wanted, problem

    def _agree_on(self, problem: str) -> None:
        """Fail on every rank if any rank's tensors do not fit, instead of leaving the others waiting."""
        failed = torch.tensor([int(bool(problem))])
        if self.distributed:
            dist.all_reduce(failed, group=self._control_group)
        if failed.item():
            raise CheckpointError(problem or "another rank's tensors do not fit the checkpoint (see its log)")
