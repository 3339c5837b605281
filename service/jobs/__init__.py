"""Training jobs: the job model and the leases of its batches.

May import ``service.core``, ``service.store``, ``service.masking``, ``service.data`` and ``service.batches``.
"""
