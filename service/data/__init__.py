"""Datasets: ingest, tokenization, packing into sequences and chunks, held-out splits, the stdlib corpus and
the catalog of open datasets.

May import ``service.core``, ``service.store`` and ``service.masking``.
"""
