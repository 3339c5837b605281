"""Masking: MLM masks of a batch, the masking units, counter-based hashing, static masks, rate schedules and
the masking parameters a request carries.

May import ``service.core`` only.
"""
