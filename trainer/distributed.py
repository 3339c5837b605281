"""Data-parallel training under ``torchrun``: every rank is one worker of a shared job.

``torchrun --nproc-per-node N -m trainer --job NAME ...`` starts N processes;
each leases its own batches from the job (so the job, not the trainer, splits
the data), gradients are averaged across ranks by DistributedDataParallel
(NCCL on CUDA, gloo on the CPU), and rank 0 alone logs, evaluates and
checkpoints. Ranks step in lockstep: before each step they agree (one small
all-reduce) whether any rank has a batch, whether any rank's stream goes on,
and where the lr schedule ends. A rank never waits on the service while the
others wait for it: when the service has nothing for it now (the job's
remaining batches are leased to the other ranks, prefetched), its stream says
so at once, and it steps with an empty batch (zero gradient) while the others
train theirs; its own request keeps asking, and the batch it gets is trained
at the next step. So no batch's lease runs out in a rank that holds it while
it waits in an all-reduce, and every batch of the job is trained once.
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


def agree(has_batch: bool, going: bool, steps: int, device: torch.device) -> tuple[bool, bool, int]:
    """Every rank calls this before each step: (whether any rank has a batch for it, whether any rank's
    data goes on, the largest of the ranks' estimates of where the lr schedule ends)."""
    flags = torch.tensor([int(has_batch), int(going), steps], dtype=torch.int64, device=_flag_device(device))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    anyone, on, agreed = flags.tolist()
    return bool(anyone), bool(on), int(agreed)


def largest(values: list[int], device: torch.device) -> list[int]:
    """Each of ``values``, the largest any rank holds: what every rank then uses (e.g. the lr schedule's
    length, estimated by each rank from the job's progress as it read it)."""
    t = torch.tensor(values, dtype=torch.int64, device=_flag_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


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
    """Leave the process group together: a rank that tears its group down while a peer still talks to it can
    have the peer's communication threads abort the peer at exit."""
    if active():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing to wait for
            pass
        dist.destroy_process_group()
