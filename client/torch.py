"""``torch.utils.data.IterableDataset`` adapters over the service's batch streams.

Each item is already a whole batch, so use ``DataLoader(ds, batch_size=None)``.
With ``num_workers=n`` worker w fetches batches ``start+w, start+w+n, ...``;
DataLoader hands them out round-robin, so the stream order (and content) is
the same for any number of workers.

    from torch.utils.data import DataLoader
    from client.torch import MaskedBatches
    loader = DataLoader(MaskedBatches(url, "wiki", batch_size=64, steps=1000), batch_size=None, num_workers=2)

``JobBatches`` does the same over a shared job (every sequence once per epoch
across all workers of the job).

Items hold only what a model's ``forward`` takes (``input_ids``,
``attention_mask``, ``labels``, all int64), so ``model(**item)`` works for any
Hugging Face masked-LM model. ``metadata=True`` adds ``sequence_ids``, ``index``
(and, for jobs, ``epoch``) tensors, for bookkeeping that the model must not see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ._batch import Batch, BatchStream
from ._client import Client


class MaskedBatches(IterableDataset):
    def __init__(
        self,
        base_url: str,
        dataset: str,
        batch_size: int = 32,
        *,
        seed: int = 0,
        start: int = 0,
        steps: int | None = None,
        prefetch: int = 2,
        token: str | None = None,
        metadata: bool = False,
        **masking: Any,
    ) -> None:
        super().__init__()
        self.base_url = base_url
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.steps = steps
        self.prefetch = prefetch
        self.token = token
        self.metadata = metadata
        self.masking = masking

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        first = self.start + worker
        # this worker's share of steps start .. start+steps-1
        count = None if self.steps is None else max(0, (self.steps - worker + workers - 1) // workers)
        with Client(self.base_url, token=self.token) as c:

            def fetch(j: int) -> Batch:
                return c.batch(self.dataset, self.batch_size, seed=self.seed, index=first + j * workers, **self.masking)

            with BatchStream(fetch, 0, count, self.prefetch) as stream:
                for batch in stream:
                    yield _item(batch, self.metadata, index=batch.index)


class JobBatches(IterableDataset):
    """The batches of a shared job (see ``Client.job``) as an ``IterableDataset``.

    Use ``DataLoader(ds, batch_size=None)``. With ``num_workers=0`` a batch is
    acked when the training loop asks for the next one, i.e. after its step.
    With loader workers, each worker attaches under its own name and acks a
    batch once it has produced the next one, which DataLoader does
    ``prefetch_factor`` batches ahead of training: a crash can then lose that
    many acked-but-untrained batches per worker. Stopping early (the loop
    breaks) acks the last batch taken; lease requests ride out outages
    shorter than ``max_outage`` seconds. With ``metadata=True`` items carry
    ``epoch``, ``index`` and ``sequence_ids`` tensors besides the model inputs.
    """

    def __init__(
        self, base_url: str, job: str, *, create: dict[str, Any] | None = None, worker: str | None = None,
        prefetch: int = 2, token: str | None = None, max_outage: float = 300.0, metadata: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.base_url = base_url
        self.job = job
        self.create = create
        self.worker = worker
        self.prefetch = prefetch
        self.token = token
        self.max_outage = max_outage
        self.metadata = metadata

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = self.worker if info is None or self.worker is None else f"{self.worker}-{info.id}"
        with Client(self.base_url, token=self.token) as c:
            with c.job(self.job, create=self.create, worker=worker, prefetch=self.prefetch,
                       max_outage=self.max_outage) as stream:  # fmt: skip
                for batch in stream:
                    yield _item(batch, self.metadata, epoch=batch.epoch, index=batch.index)


def _item(batch: Batch, metadata: bool, **scalars: int) -> dict[str, torch.Tensor]:
    """A batch as the tensors a DataLoader yields: the model inputs, and with ``metadata``
    also ``sequence_ids`` and the given scalars."""
    out = batch.torch()
    if metadata:
        out["sequence_ids"] = torch.from_numpy(batch["sequence_ids"])
        for name, value in scalars.items():
            out[name] = torch.tensor(value)
    return out
