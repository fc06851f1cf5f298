"""Running under ``torchrun``: the process group from its environment variables (gloo on the CPU,
nccl on CUDA), which slice of each global batch this process takes, and sums across processes."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this fit started the process group, so it ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This process's part of a global batch: every world_size-th index from its rank on."""
        return indices[self.rank::self.world_size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (float64, so counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def setup(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone. A group the caller
    already started is used as it is."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistContext()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def default_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, else this process's GPU (LOCAL_RANK under torchrun) or the CPU."""
    try:
        dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a device torch knows (cpu, cuda, cuda:1, ...): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu, or leave --device out")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job: they train but do not write results."""
    return int(os.environ.get("RANK", "0")) == 0
