"""Epoch orders: keyed permutations evaluated per element, served to batches a cached block at a time."""

from __future__ import annotations

import numpy as np
import pytest

from service.batches.permute import BLOCK, batch_ids, permute


@pytest.mark.parametrize("n", [1, 2, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_an_epoch_is_a_permutation_and_batches_slice_it(n: int):
    order = permute(5, 2, n, np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert n < 8 or not np.array_equal(order, np.arange(n))
    for b in (1, 64, 1000, BLOCK + 3, 3 * BLOCK):  # within a block, across two, wider than a block
        bpe = -(-n // b)
        got = np.concatenate([batch_ids(5, 2, n, b, i, True) for i in range(bpe)])
        assert np.array_equal(got, order), (n, b)
        assert len(batch_ids(5, 2, n, b, bpe - 1, True)) == n - (bpe - 1) * b  # the short last batch


def test_orders_differ_by_seed_and_epoch_and_batches_are_private_copies():
    n = 5000
    a, b, c = (permute(s, e, n, np.arange(n)) for s, e in ((1, 0), (1, 1), (2, 0)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    ids = batch_ids(1, 0, n, 64, 3, True)
    ids[:] = -1  # the caller may scribble on it: the cached block is untouched
    assert np.array_equal(batch_ids(1, 0, n, 64, 3, True), a[192:256])
    assert np.array_equal(batch_ids(1, 0, n, 64, 3, False), np.arange(192, 256))
