"""Batches: fetching sequences, masking them and rendering the response body; sampling orders.

May import ``service.core``, ``service.store``, ``service.masking``, ``service.data`` and ``wire``.
"""
