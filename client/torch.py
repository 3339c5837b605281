"""A ``torch.utils.data.IterableDataset`` over the service's batch stream.

Each item is already a whole batch, so use ``DataLoader(ds, batch_size=None)``.
With ``num_workers=n`` worker w fetches batches ``start+w, start+w+n, ...``;
DataLoader hands them out round-robin, so the stream order (and content) is
the same for any number of workers.

    from torch.utils.data import DataLoader
    from client.torch import MaskedBatches
    loader = DataLoader(MaskedBatches(url, "wiki", batch_size=64, steps=1000), batch_size=None, num_workers=2)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ._batch import Batch
from ._client import BatchStream, Client


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
                    out = batch.torch()
                    out["sequence_ids"] = torch.from_numpy(batch["sequence_ids"])
                    out["index"] = torch.tensor(batch.index)
                    yield out
