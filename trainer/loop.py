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
    "batch", "metadata" (a client batch's), "model", "sources" (a mixture batch's source of each row, else
    None)}, before that step's checkpoint; evaluation may run in it (the model is put back in training mode).
    A string it returns is appended to that step's log line, when the step logs one.
    horizon: called after each trained step as ``horizon(steps_done, metadata)``; a number it returns
    becomes cfg.steps, the step the lr schedule ends at (under DDP the ranks agree on the largest).
    """
    log = log or (lambda _msg: None)
    if not 0 <= start_step <= cfg.steps:
        raise ValueError(f"start_step {start_step} is outside [0, {cfg.steps}]")
    loop = _Loop(model, cfg, start_step=start_step, optimizer_state=optimizer_state, data_state=data_state,
                 log=log, rng=rng)  # fmt: skip
    precision = "bf16 autocast" if loop.use_amp else "fp32"
    log(f"training on {loop.device} ({precision}) | {model.num_parameters() / 1e6:.2f}M params "
        f"| steps {start_step} -> {cfg.steps}")
    return loop.run(batches, on_step=on_step, horizon=horizon)


_AGAIN = object()  # no rank has a batch yet, and some wait for the service: the ranks agree again


class _Window:
    """The steps since the last log line: their losses stay on the device until the line syncs them, once."""

    def __init__(self, device: torch.device) -> None:
        self.losses: list[torch.Tensor] = []
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.seqs, self.data_t, self.start = 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        self.losses.append(loss.detach())
        self.tokens += batch["attention_mask"].sum()
        self.seqs += batch["input_ids"].shape[0]

    def flush(self, result: TrainResult) -> list[float]:
        """The window's losses as numbers (a sync with the device), added to the result's."""
        values = torch.stack(self.losses).float().tolist() if self.losses else []
        self.losses.clear()
        result.losses.extend(values)
        return values

    def line(self, step: int, steps: int, lr: float, result: TrainResult) -> str:
        """The log line of the window ending at ``step``; the next window starts."""
        values = self.flush(result)
        window_t = time.perf_counter() - self.start
        mean_loss = sum(values) / max(len(values), 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {step}")
        compute_t = window_t - self.data_t
        text = (f"step {step:>6}/{steps} | loss {mean_loss:.4f} | lr {lr:.2e} "
                f"| {self.seqs / window_t:,.1f} seq/s | {self.tokens.item() / window_t:,.0f} tok/s "
                f"| data wait {self.data_t:.2f}s ({100 * self.data_t / window_t:.0f}%) "
                f"compute {compute_t:.2f}s")  # fmt: skip
        self.tokens.zero_()
        self.seqs, self.data_t, self.start = 0, 0.0, time.perf_counter()
        return text


class _Loop:
    """One call of `train`: the model on its device, its optimizer (and DDP wrapper), and where the run is."""

    def __init__(self, model: MaskedLM, cfg: TrainConfig, *, start_step: int, optimizer_state: dict | None,
                 data_state: DataState, log: Callable[[str], Any], rng: Mapping[str, Any] | None) -> None:  # fmt: skip
        from . import distributed

        self.model, self.cfg, self.data_state, self.log = model, cfg, data_state, log
        self.start_step = self.step = start_step
        self.device = device = resolve_device(cfg.device)
        model.to(device)
        if rng is not None:
            set_rng_state(rng)
        else:
            torch.manual_seed(cfg.seed + start_step)  # dropout stream
        model.train()
        self.use_amp = cfg.amp and device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(start_step, cfg),
                                           betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type == "cuda")
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.ddp = distributed.active()
        self.net: torch.nn.Module = model
        if self.ddp:  # gradients averaged across ranks in backward; the optimizer and checkpoints see `model`
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
        self.result = TrainResult(final_step=start_step)
        self.window = _Window(device)
        self.total_seqs = 0
        self.estimate = cfg.steps  # this rank's view of where the schedule ends (the horizon's latest answer)

    def checkpoint(self, step: int) -> None:
        cfg = self.cfg
        save_checkpoint(cfg.checkpoint, {
            "model_config": asdict(self.model.config),
            "train_config": asdict(cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # The schedule is a pure function of the step; stored for reference.
            "scheduler": {"kind": "linear_warmup_linear_decay", "lr": cfg.lr,
                          "warmup_steps": cfg.warmup_steps, "total_steps": cfg.steps,
                          "last_lr": lr_at(max(step - 1, 0), cfg)},
            "step": step,
            "data": _data_position(self.data_state, step),
            "rng": rng_state(),
        })  # fmt: skip
        self.log(f"checkpoint: step {step} -> {cfg.checkpoint}")

    def run(self, batches: Iterable[Any], *, on_step: StepHook | None, horizon: Horizon | None) -> TrainResult:
        """Step until cfg.steps (or the data's end); checkpoint at the end."""
        cfg, result = self.cfg, self.result
        it = iter(batches)
        t0 = time.perf_counter()
        try:
            while cfg.until_data_ends or self.step < cfg.steps:
                fetched = self._next_batch(it)
                if fetched is _AGAIN:
                    continue
                if fetched is None:
                    break
                raw, batch, idle = fetched
                logits, loss, lr = self._step(batch)
                if idle:  # an empty step to keep the ranks' all-reduces paired: nothing to count
                    result.final_step = self.step
                    continue
                self._stepped(raw, batch, logits, loss, lr, on_step=on_step, horizon=horizon)
        finally:
            self.window.flush(result)
            result.elapsed = time.perf_counter() - t0
            result.sequences_per_sec = self.total_seqs / result.elapsed if result.elapsed > 0 else 0.0
        if cfg.checkpoint and self.step > self.start_step:
            self.checkpoint(self.step)
        return result

    def _next_batch(self, it: Any) -> Any:
        """(the batch as it came, on the device, whether it is an empty one), _AGAIN, or None once the data
        ended. In lockstep every rank steps while any rank has a batch: one without joins with an empty one."""
        from . import distributed

        t_wait = time.perf_counter()
        try:
            raw, ended = _fetch(it, self.ddp)
        except BaseException:
            # Between steps the model and optimizer are consistent: keep the
            # progress so a run cut off by the data source can be resumed.
            if self.cfg.checkpoint and self.step > self.start_step:
                self.checkpoint(self.step)
            raise
        idle = False
        if self.ddp:
            anyone, going, self.cfg.steps = distributed.agree(raw is not None, not ended, self.estimate, self.device)
            if not anyone:
                waited = time.perf_counter() - t_wait
                self.window.data_t += waited
                self.result.data_wait += waited
                if going:
                    return _AGAIN
                self.log(f"data stream ended after step {self.step}; stopping")
                return None
            idle = raw is None
        elif ended:
            self.log(f"data stream ended after step {self.step}; stopping")
            return None
        batch = _to_device(raw, self.device) if not idle else distributed.empty_batch(self.model.config.max_len,
                                                                                        self.device)  # fmt: skip
        self.window.data_t += time.perf_counter() - t_wait
        self.result.data_wait += time.perf_counter() - t_wait
        return raw, batch, idle

    def _step(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step on ``batch``: (logits, loss, the lr it used)."""
        cfg = self.cfg
        if cfg.until_data_ends and self.step >= cfg.steps:  # more data than estimated: the schedule's last step
            cfg.steps = self.step + 1
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else contextlib.nullcontext():
            logits, loss = self.net(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return logits, loss, lr

    def _stepped(self, raw: Any, batch: Mapping[str, torch.Tensor], logits: torch.Tensor, loss: torch.Tensor,
                 lr: float, *, on_step: StepHook | None, horizon: Horizon | None) -> None:  # fmt: skip
        """After a trained step: the schedule's end, the counts, ``on_step``, the log line, the checkpoint."""
        cfg, step = self.cfg, self.step
        metadata = getattr(raw, "metadata", None)
        if horizon is not None:
            self.estimate = horizon(step, metadata) or self.estimate
            if not self.ddp:
                cfg.steps = self.estimate
        self.window.add(loss, batch)
        self.total_seqs += batch["input_ids"].shape[0]
        self.result.final_step = step
        note = None
        if on_step is not None:
            labels = batch["labels"]
            targets = labels[labels != -100]
            correct = (logits.detach().argmax(dim=-1) == targets).sum()
            note = on_step(step, {"loss": loss.detach(), "correct": correct, "tokens": targets.numel(), "lr": lr,
                                  "batch": batch, "metadata": metadata, "model": self.model,
                                  "sources": getattr(raw, "sources", None)})  # fmt: skip
        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps:
            self.log(self.window.line(step, cfg.steps, lr, self.result) + (note if isinstance(note, str) else ""))
        if cfg.checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            self.checkpoint(step)


__all__ = [
    "TrainConfig", "TrainResult", "train", "lr_at", "param_groups",
    "load_checkpoint", "save_checkpoint", "resolve_device", "rng_state", "set_rng_state",
]
