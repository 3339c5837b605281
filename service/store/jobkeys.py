"""The Redis keys of jobs and the helpers that name them (the scripts that use them: jobstore.py).

A job's keys share the job's own hash tag, so every script touches one slot,
and the jobs of a cluster spread over its masters::

    P:job:{J}                           HASH   dataset, its uid, config, status, epoch, next, counters,
                                               lease-signing keys (the job -> dataset lookup, too),
                                               acked_top (latest epoch acked ahead of the cursor)
    P:job:{J}:leases                    ZSET   "epoch:index" -> lease expiry (ms, Redis clock)
    P:job:{J}:lease                     HASH   "epoch:index" -> "lease id|worker|request id" (or "-0"/"-1":
                                               taken back from a failed request)
    P:job:{J}:acked:<epoch>             STRING bitmap of acked batch indices
    P:job:{J}:ackcount                  HASH   epoch -> batches acked
    P:job:{J}:workers                   HASH   "<worker>:<counter>" -> value
    P:job:{J}:seen                      ZSET   worker -> last request (ms); idle workers fold into totals
    P:job:{J}:requests                  HASH   "worker|request id" -> "epoch:index|redelivered|in order|
                                               answered again", one per live lease granted to a request
                                               that carried an id
    P:job:{J}:ahead                     SET    "epoch:index" acked ahead of the cursor (epoch, next): the
                                               cursor skips them (see "Rolled back" in jobstore.py)
    P:job:{J}:wstats                    HASH   worker -> "time ms|batches|wait s|step s|leases|lease s": the
                                               last summary of its consumer's data wait and step time and of
                                               its lease round trips it sent (the last two may be absent;
                                               expires with the workers' idleness; not a lease key)

The dataset lists its jobs in its own slot (``P:ds:{D}:jobs``, see keys.py):
a job is created in its slot and then listed (the listing checks that the
dataset still exists, else the job is deleted again); a deleted dataset's jobs
are deleted from the list it leaves in its trash. No script spans both slots.
No key name is built inside Lua: the acked bitmap of each lease's epoch is
passed in ``KEYS`` beside it.
"""

from __future__ import annotations

import re

from .keys import Keys

# A job's keys besides its hash and its acked bitmaps: P:job:{J}:<part>
JOB_KEY_PARTS = ("leases", "lease", "workers", "ackcount", "seen", "requests", "ahead")

_EPOCH = re.compile(r"^(\d{1,15}):")


class JobKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._keys = Keys(prefix)

    def job(self, job: str) -> str:
        return self._keys.job(job)

    def lease_keys(self, job: str) -> list[str]:
        base = self.job(job)
        return [base, *(f"{base}:{part}" for part in JOB_KEY_PARTS)]

    def stats(self, job: str) -> str:
        """The job's per-worker summaries of data wait and step time."""
        return f"{self.job(job)}:wstats"

    def acked(self, job: str, epoch: int) -> str:
        return f"{self.job(job)}:acked:{epoch}"

    def with_acks(self, job: str, leases: list[str]) -> list[str]:
        """The prelude's keys and, per lease id, the acked bitmap of its epoch (epoch 0's for a malformed id,
        which the scripts refuse before touching it)."""
        acked = [self.acked(job, int(m.group(1)) if (m := _EPOCH.match(lease)) else 0) for lease in leases]
        return [*self.lease_keys(job), *acked]

    def all_keys(self, job: str, epochs: int) -> list[str]:
        return [*self.lease_keys(job), *(self.acked(job, e) for e in range(epochs))]
