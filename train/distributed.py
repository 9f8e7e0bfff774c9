"""Data-parallel training under torchrun: which rank this process is, and the few collectives the
trainer needs. A plain `lstmgen train` (no torchrun variables) is world size 1 and never touches
torch.distributed.

The global batch stays `batch_size` streams: rank r trains the r-th contiguous block of them, so a
2-process step sees exactly the tokens a 1-process step sees, and DistributedDataParallel's gradient
average (of per-rank means over equal shards) is the single-process mean's gradient.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous block of n streams (sizes differ by at most one, like np.array_split)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def from_env() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; world size 1 without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(info: DistInfo, device: torch.device) -> None:
    """Join the process group: nccl for CUDA, gloo for CPU."""
    if not info.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop(info: DistInfo) -> None:
    """Leave the process group while the interpreter is fully alive. DistributedDataParallel holds
    the group in reference cycles; left to interpreter shutdown, gloo's threads are torn down
    mid-finalisation and the process dies with SIGABRT (seen on a loaded CI machine)."""
    if info.enabled and dist.is_initialized():
        gc.collect()  # the trainer's DDP wrapper is garbage by now: free it and its hold on the group
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (float64 on the values' device, so counts stay exact)."""
    out = values.detach().to(torch.float64).clone()
    if info.enabled:
        dist.all_reduce(out)
    return out


def any_rank(info: DistInfo, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (time limits must stop all ranks together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_streams(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """[L, b, H] per rank (equal b) -> [L, world * b, H] in rank order: the whole batch's state."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def gather_objects(info: DistInfo, obj) -> list:
    """Every rank's `obj`, in rank order (e.g. per-rank RNG states for a resumable checkpoint)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
