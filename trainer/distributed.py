"""Data-parallel training under ``torchrun``: every rank is one worker of a shared job.

``torchrun --nproc-per-node N -m trainer --job NAME ...`` starts N processes;
each leases its own batches from the job (so the job, not the trainer, splits
the data), gradients are averaged across ranks by DistributedDataParallel
(NCCL on CUDA, gloo on the CPU), and rank 0 alone logs, evaluates and
checkpoints. Ranks step in lockstep: before each step they agree (one small
all-reduce) whether any rank has a batch; a rank whose stream ran dry steps
with an empty batch (zero gradient) until every rank's has, so no rank waits
in an all-reduce forever and every batch of the job is trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def from_env() -> Group | None:
    """The process group torchrun describes in the environment (None for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(group: Group, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _flag_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_has(has_batch: bool, device: torch.device) -> bool:
    """Whether any rank has a batch for the next step (every rank calls this once per step)."""
    flag = torch.tensor([1 if has_batch else 0], dtype=torch.int32, device=_flag_device(device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def empty_batch(seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-row batch with nothing to predict: a rank whose stream ran dry steps with it (its gradient
    is zero) while the others train their last batches, so every batch of the job is trained."""
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}


def in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether all ranks hold the same weights (a checksum compared across ranks)."""
    total = torch.zeros(1, dtype=torch.float64, device=_flag_device(device))
    for p in model.parameters():
        total += p.detach().double().sum().to(total.device)
    high, low = total.clone(), total.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool((high - low).abs().item() == 0.0)


def finish() -> None:
    if active():
        dist.destroy_process_group()
