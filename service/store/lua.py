"""Lua shared by the store's scripts, prepended to those that need it."""

from __future__ import annotations

# The server's clock: defines ``now``, milliseconds since the epoch (TIME answers seconds and microseconds).
# Every script that stamps or compares a time reads it so, so that all agree on one clock: the server's.
NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
