"""A small RoBERTa-style MLM trainer that pulls masked batches from a maskserve service.

Run it as a process with ``python -m trainer --dataset NAME`` (see ``--help``), or
use the pieces directly: build a ``MaskedLM`` from an ``EncoderConfig`` and call
``train(model, batches, TrainConfig(...))`` on any iterable of batch dicts.
"""

from .loop import TrainConfig, TrainResult, load_checkpoint, train
from .model import EncoderConfig, MaskedLM

__all__ = ["EncoderConfig", "MaskedLM", "TrainConfig", "TrainResult", "train", "load_checkpoint"]
