"""Data-parallel interpreter training with torch.distributed: one process per GPU (or CPU process).

    torchrun --standalone --nproc-per-node 4 $(which dit) stage train-interpreter --engine local

Under torchrun (WORLD_SIZE > 1) every rank holds the whole model, the interpreter adapter and the diff
bank. Each micro-batch of `interpreter.batch_size` rows is split into contiguous parts, one per rank;
each rank back-propagates its part's share of the batch's mean loss, and the adapter gradients are summed
over ranks (one all-reduce per optimizer step) before every rank takes the same optimizer step. The global
batch stays `interpreter.batch_size`, so the result does not depend on the number of processes (up to
float rounding: the sums run in another order and sub-batches pad to their own length). Only rank 0 writes
checkpoints, the curve and the interpreter files, and logs to MLflow. Backend: NCCL on CUDA (each rank on
cuda:LOCAL_RANK), gloo on a CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads WORLD_SIZE without it
    import torch

log = logging.getLogger(__name__)


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def rank_from_env() -> int:
    """RANK as torchrun sets it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if world_size_from_env() > 1 else 0


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks (world_size 1: one process, everything local)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    def part(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's contiguous part of n rows; the first n % world_size ranks get one more."""
        base, extra = divmod(n, self.world_size)
        return self.rank * base + min(self.rank, extra), base + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def sum_gradients(self, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Sum the parameters' gradients and `loss` (a scalar) over ranks in one all-reduce; returns the summed
        loss. A parameter without a gradient on every rank keeps none (the optimizer skips it, as it would
        in one process)."""
        if not self.enabled:
            return loss
        import torch
        import torch.distributed as dist

        device = loss.device
        parts, has = [], []
        for p in params:
            has.append(p.grad is not None)
            parts.append(p.grad.reshape(-1).float() if p.grad is not None
                         else torch.zeros(p.numel(), device=device, dtype=torch.float32))
        flags = torch.tensor([float(h) for h in has], device=device)
        buf = torch.cat([*(x.to(device) for x in parts), flags, loss.detach().float().reshape(1)])
        dist.all_reduce(buf)
        offset, total = 0, sum(p.numel() for p in params)
        for p, anywhere in zip(params, buf[total:total + len(params)].tolist()):
            n = p.numel()
            p.grad = buf[offset:offset + n].view_as(p).to(p.dtype) if anywhere else None
            offset += n
        return buf[-1].to(loss.dtype)

    def mean(self, values: list[float], device: torch.device | str = "cpu") -> float | None:
        """Mean of every rank's values (None when there are none at all)."""
        if not self.enabled:
            return sum(values) / len(values) if values else None
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(sum(values)), float(len(values))], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t[0].item() / t[1].item() if t[1].item() else None


_current: DataParallel | None = None


def current(device: str = "auto") -> DataParallel:
    """This process's DataParallel; under torchrun the first call joins the process group (NCCL when the
    model runs on CUDA, gloo on a CPU) and, on CUDA, makes cuda:LOCAL_RANK this process's device."""
    global _current
    if _current is not None:
        return _current
    world = world_size_from_env()
    if world <= 1:
        _current = DataParallel()
        return _current
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                           "`torchrun --nproc-per-node N $(which dit) stage train-interpreter ...`")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                               "use --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    _current = DataParallel(dist.get_rank(), dist.get_world_size())
    log.info("data-parallel interpreter training: rank %d of %d (%s)", _current.rank, _current.world_size,
             dist.get_backend())
    return _current
