"""The training loop: AdamW, linear warmup then linear decay, logging, checkpoints.

`train` consumes any iterable of batches (dicts of tensors). Step s (0-based)
uses the s-th item the iterable yields, so a data stream whose batch k is a pure
function of (seed, k) can be resumed exactly by starting it at k = start_step.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .model import MaskedLM


@dataclass
class TrainConfig:
    steps: int = 1000  # total steps of the run (also where the lr reaches 0)
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    log_every: int = 10
    device: str = "auto"  # "auto" | "cpu" | "cuda" (or "cuda:N")
    amp: bool = True  # bf16 autocast, CUDA only
    checkpoint: str | None = None  # path; written every checkpoint_every steps and at the end
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0
    # train until the data ends (a job's end), not until `steps`: `steps` is then where the lr schedule ends,
    # an estimate that a `horizon` passed to `train` may move as the run goes
    until_data_ends: bool = False


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step run, in order
    final_step: int = 0  # number of completed steps (the step to resume from)
    elapsed: float = 0.0  # seconds
    sequences_per_sec: float = 0.0
    data_wait: float = 0.0  # seconds spent waiting for batches (in lockstep: for any rank's)


DataState = Callable[[int], dict] | Mapping[str, Any] | None
StepHook = Callable[[int, dict[str, Any]], Any]
Horizon = Callable[[int, Mapping[str, Any] | None], int | None]
# In lockstep, how long a rank waits for a batch while the service has none for it now (the rest of the job is
# leased to other ranks), before the ranks agree again: it then steps with an empty batch while they train.
STARVED_PATIENCE_S = 0.05


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return dev


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate used for 0-based step `step`.

    Warmup ramps linearly to cfg.lr over warmup_steps (step 0 already gets
    lr / warmup_steps, not 0), then the rate decays linearly to 0 at cfg.steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * max(0.0, (cfg.steps - step) / decay_steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only; biases and
    LayerNorm parameters (all 1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields the tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `train`. Keys: model_config, train_config,
    model, optimizer, scheduler, step, data."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """torch.save to a temporary file first, so a crash never leaves half a checkpoint."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The generator states dropout draws from (CPU, and every CUDA device in use): saved in
    checkpoints so a resumed run draws the very dropout masks the uninterrupted one would."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _data_position(data_state: DataState, step: int) -> dict:
    if data_state is None:
        return {"step": step}
    if callable(data_state):
        return dict(data_state(step))
    return {**data_state, "step": step}


def _to_device(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):  # e.g. a client Batch object
        batch = batch.torch(device)
    return {k: v if v.device == device else v.to(device, non_blocking=True) for k, v in batch.items()}


def _fetch(it: Any, lockstep: bool) -> tuple[Any, bool]:
    """(the next batch or None, whether the data has ended). In lockstep, a source that can say so (a job
    stream's ``poll``) gives None at once while it has nothing for this rank, rather than waiting: the other
    ranks may hold the batches it would wait for, and they wait for this rank in the step's all-reduce."""
    poll = getattr(it, "poll", None) if lockstep else None
    try:
        return (poll(STARVED_PATIENCE_S) if poll is not None else next(it)), False
    except StopIteration:
        return None, True


def train(
    model: MaskedLM,
    batches: Iterable[Mapping[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    data_state: DataState = None,
    log: Callable[[str], Any] | None = print,
    rng: Mapping[str, Any] | None = None,
    on_step: StepHook | None = None,
    horizon: Horizon | None = None,
) -> TrainResult:
    """Train `model` in place from step `start_step` up to cfg.steps.

    batches: yields {"input_ids", "attention_mask", "labels"} tensors of shape
    (B, L); the first item is used for step start_step. Training stops early if
    the iterable runs out.
    optimizer_state: AdamW state_dict to resume from (checkpoint["optimizer"]).
    data_state: describes where the data stream is, stored in checkpoints as
    checkpoint["data"]; a callable gets the number of completed steps.
    rng: generator states to resume from (checkpoint["rng"]); without them
    the dropout stream is seeded from cfg.seed + start_step, which only a run
    started at step 0 reproduces.
    on_step: called after each step as ``on_step(steps_done, info)`` with
    ``info`` = {"loss", "correct" (0-d tensors, not synced), "tokens", "lr",
    "batch", "metadata" (a client batch's), "model"}, before that step's checkpoint; evaluation may run in it (the
    model is put back in training mode).
    horizon: called after each trained step as ``horizon(steps_done, metadata)``; a number it returns
    becomes cfg.steps, the step the lr schedule ends at (under DDP the ranks agree on the largest).
    """
    log = log or (lambda _msg: None)
    if not 0 <= start_step <= cfg.steps:
        raise ValueError(f"start_step {start_step} is outside [0, {cfg.steps}]")
    device = resolve_device(cfg.device)
    model.to(device)
    if rng is not None:
        set_rng_state(rng)
    else:
        torch.manual_seed(cfg.seed + start_step)  # dropout stream
    model.train()

    use_amp = cfg.amp and device.type == "cuda"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(start_step, cfg),
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    def checkpoint(step: int) -> None:
        save_checkpoint(cfg.checkpoint, {
            "model_config": asdict(model.config),
            "train_config": asdict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            # The schedule is a pure function of the step; stored for reference.
            "scheduler": {"kind": "linear_warmup_linear_decay", "lr": cfg.lr,
                          "warmup_steps": cfg.warmup_steps, "total_steps": cfg.steps,
                          "last_lr": lr_at(max(step - 1, 0), cfg)},
            "step": step,
            "data": _data_position(data_state, step),
            "rng": rng_state(),
        })
        log(f"checkpoint: step {step} -> {cfg.checkpoint}")

    from . import distributed

    ddp = distributed.active()
    net: torch.nn.Module = model
    if ddp:  # gradients averaged across ranks in backward; the optimizer and checkpoints see `model`
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    precision = "bf16 autocast" if use_amp else "fp32"
    log(f"training on {device} ({precision}) | {model.num_parameters() / 1e6:.2f}M params "
        f"| steps {start_step} -> {cfg.steps}")

    result = TrainResult(final_step=start_step)
    window_losses: list[torch.Tensor] = []  # kept on device; synced once per log line
    window_tokens = torch.zeros((), dtype=torch.long, device=device)
    window_seqs, window_data_t, window_start = 0, 0.0, time.perf_counter()
    total_seqs, t0 = 0, time.perf_counter()

    def flush_losses() -> list[float]:
        values = torch.stack(window_losses).float().tolist() if window_losses else []
        window_losses.clear()
        result.losses.extend(values)
        return values

    it = iter(batches)
    step = start_step
    estimate = cfg.steps  # this rank's view of where the schedule ends (the horizon's latest answer)
    try:
        while cfg.until_data_ends or step < cfg.steps:
            t_wait = time.perf_counter()
            try:
                raw, ended = _fetch(it, ddp)
            except BaseException:
                # Between steps the model and optimizer are consistent: keep the
                # progress so a run cut off by the data source can be resumed.
                if cfg.checkpoint and step > start_step:
                    checkpoint(step)
                raise
            idle = False
            if ddp:  # every rank steps while any rank has a batch: one without joins with an empty one
                anyone, going, cfg.steps = distributed.agree(raw is not None, not ended, estimate, device)
                if not anyone:
                    waited = time.perf_counter() - t_wait
                    window_data_t += waited
                    result.data_wait += waited
                    if going:  # no rank has a batch yet, and some wait for the service: agree again
                        continue
                    log(f"data stream ended after step {step}; stopping")
                    break
                idle = raw is None
            elif ended:
                log(f"data stream ended after step {step}; stopping")
                break
            batch = _to_device(raw, device) if not idle else distributed.empty_batch(model.config.max_len, device)
            window_data_t += time.perf_counter() - t_wait
            result.data_wait += time.perf_counter() - t_wait

            if cfg.until_data_ends and step >= cfg.steps:  # more data than estimated: the schedule's last step
                cfg.steps = step + 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                logits, loss = net(batch["input_ids"], batch["attention_mask"], batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1

            if idle:  # an empty step to keep the ranks' all-reduces paired: nothing to count
                result.final_step = step
                continue
            if horizon is not None:
                estimate = horizon(step, getattr(raw, "metadata", None)) or estimate
                if not ddp:
                    cfg.steps = estimate
            window_losses.append(loss.detach())
            window_tokens += batch["attention_mask"].sum()
            window_seqs += batch["input_ids"].shape[0]
            total_seqs += batch["input_ids"].shape[0]
            result.final_step = step
            if on_step is not None:
                labels = batch["labels"]
                targets = labels[labels != -100]
                correct = (logits.detach().argmax(dim=-1) == targets).sum()
                on_step(step, {"loss": loss.detach(), "correct": correct, "tokens": targets.numel(), "lr": lr,
                               "batch": batch, "metadata": getattr(raw, "metadata", None), "model": model})

            if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps:
                values = flush_losses()  # syncs with the device
                window_t = time.perf_counter() - window_start
                mean_loss = sum(values) / max(len(values), 1)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}")
                compute_t = window_t - window_data_t
                log(f"step {step:>6}/{cfg.steps} | loss {mean_loss:.4f} | lr {lr:.2e} "
                    f"| {window_seqs / window_t:,.1f} seq/s | {window_tokens.item() / window_t:,.0f} tok/s "
                    f"| data wait {window_data_t:.2f}s ({100 * window_data_t / window_t:.0f}%) "
                    f"compute {compute_t:.2f}s")
                window_tokens.zero_()
                window_seqs, window_data_t, window_start = 0, 0.0, time.perf_counter()

            if cfg.checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and step < cfg.steps:
                checkpoint(step)
    finally:
        flush_losses()
        result.elapsed = time.perf_counter() - t0
        result.sequences_per_sec = total_seqs / result.elapsed if result.elapsed > 0 else 0.0

    if cfg.checkpoint and step > start_step:
        checkpoint(step)
    return result


__all__ = [
    "TrainConfig", "TrainResult", "train", "lr_at", "param_groups",
    "load_checkpoint", "save_checkpoint", "resolve_device", "rng_state", "set_rng_state",
]
