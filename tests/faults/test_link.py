"""The link-chaos suite: a chaos proxy between the source and the target agents.

Real daemons, real FUSE mount, real TCP through :class:`~tests.faults.proxy.ChaosProxy`.
While the proxy cuts, stalls, throttles, delays, freezes or corrupts the link, a
:class:`~tests.faults.invariants.RecordWorkload` writes through the mount and a
:class:`~tests.faults.invariants.Sampler` checks the target all along (applied seq never
backwards, replica always a prefix of the source's history). Every scenario then lifts
the chaos, waits until the target has everything, and compares the trees byte for byte
with their metadata.

Unmarked tests are the representative subset ``make test`` runs (about 40 s); the
``faults_full`` ones take minutes (idle timeouts of 45 s, random multi-round mixes).
Replay a random run with ``MIRRORLINE_FAULT_SEED=<seed printed in the output>``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.invariants import RecordWorkload, Sampler, connection, seed_for, settle
from tests.faults.proxy import ChaosProxy, Direction
from tests.faults.stats import count
from tests.system.harness import Agent, Cluster, diff_trees, replica_of, wait_until

pytestmark = [pytest.mark.system, pytest.mark.fuse]


@dataclass
class Rig:
    target: Agent
    source: Agent
    proxy: ChaosProxy
    volume: Path
    replica: Path
    workload: RecordWorkload
    sampler: Sampler
    seed: int

    def calm(self) -> None:
        """Lift every kind of chaos."""
        self.proxy.cut_randomly(None)
        self.proxy.throttle(None)
        self.proxy.delay(0)
        self.proxy.release()

    def finish(self, *, settle_timeout: float = 240) -> None:
        """Stop writing, lift the chaos, wait for the target, check everything."""
        self.workload.stop()
        self.calm()
        settle(self.source, settle_timeout)
        self.sampler.stop()
        self.sampler.sample()            # one last look at the final state
        self.sampler.assert_ok()
        problems = diff_trees(self.volume, self.replica)
        assert problems == [], f"seed {self.seed}: replica differs:\n" + "\n".join(problems[:40])
        compared = self.workload.check_replica(self.replica)
        files = sum(len(fs) + len(ds) for _, ds, fs in os.walk(self.volume))
        count("bytes_compared", compared)
        count("files_compared", files)
        count("scenarios")
        print(f"seed {self.seed}: {self.workload.next} records, {self.workload.churn_ops} churn "
              f"ops, {self.sampler.samples} samples (high seq {self.sampler.high_seq}), "
              f"proxy {dict(self.proxy.stats)}")


@contextmanager
def rig(cluster: Cluster, tmp_path: Path, seed: int, *, pace: float = 0.002) -> Iterator[Rig]:
    """A target, a proxy in front of it, a source dialling the proxy, the workload and the
    sampler running. Everything is stopped on the way out, even when the test failed."""
    print(f"seed {seed} (replay: MIRRORLINE_FAULT_SEED={seed})")
    target = cluster.target()
    target.start()
    proxy = ChaosProxy(("127.0.0.1", target.extra["port"]), seed=seed).start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")], via={1: proxy.address})
    workload: RecordWorkload | None = None
    sampler: Sampler | None = None
    try:
        source.start()
        wait_until(lambda: connection(source)["state"] == "replicating", 60,
                   what="the connection through the proxy to come up")
        replica = replica_of(target, "src1", "data")
        workload = RecordWorkload(volume, files=4, seed=seed, pace=pace).start()
        sampler = Sampler(workload, target, replica).start()
        yield Rig(target, source, proxy, volume, replica, workload, sampler, seed)
    finally:
        if sampler is not None:
            sampler.stop()
        if workload is not None:
            workload.stop_quietly()
        proxy.close()


def _wait_links(proxy: ChaosProxy, n: int, timeout: float, why: str) -> None:
    wait_until(lambda: proxy.links_opened >= n, timeout, interval=0.05,
               what=f"{why} (links opened through the proxy: {proxy.links_opened}, want {n})")


# -- representative subset (make test) ------------------------------------------------------

def test_random_cuts_during_steady_writes(cluster: Cluster, tmp_path: Path) -> None:
    seed = seed_for(1001)
    with rig(cluster, tmp_path, seed) as r:
        r.workload.wait_records(100)
        r.proxy.cut_randomly(2.0)             # RST or FIN, about twice a second
        deadline = time.monotonic() + 20
        while r.proxy.stats["cuts"] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        r.proxy.cut_randomly(None)
        cuts = r.proxy.stats["cuts"]
        assert cuts >= 3, f"the proxy cut only {cuts} links in 20 s: the scenario did nothing"
        # The source came back after every cut: a link was opened after the last one.
        _wait_links(r.proxy, cuts + 1, 60, "the source to reconnect after the last cut")
        r.finish()
        count("link_cuts", cuts)


def test_stall_throttle_and_delay(cluster: Cluster, tmp_path: Path) -> None:
    seed = seed_for(1002)
    with rig(cluster, tmp_path, seed) as r:
        r.workload.wait_records(50)
        # A 3 s stall is far below the 45 s idle timeout: the session must survive it.
        links = r.proxy.links_opened
        before = r.workload.next
        r.proxy.stall(3)
        time.sleep(3.5)
        assert r.workload.next > before + 50, "the application blocked while the link stalled"
        r.workload.wait_records(50)
        assert r.proxy.links_opened == links, "a 3 s stall made the source reconnect"
        assert connection(r.source)["state"] == "replicating"
        # Throttled to 100 KB/s with 20 ms per chunk: the application keeps writing at its
        # own pace, the target falls behind, nothing is lost.
        rate = 100_000
        r.proxy.throttle(rate)
        r.proxy.delay(20)
        sent0, t0, before = r.proxy.stats["bytes_up"], time.monotonic(), r.workload.next
        time.sleep(3)
        sent, spent = r.proxy.stats["bytes_up"] - sent0, time.monotonic() - t0
        assert r.workload.next > before + 100, "the application blocked behind a slow link"
        assert sent <= rate * spent * 1.3 + 65536, f"throttle leaked: {sent} B in {spent:.1f} s"
        conn = connection(r.source)
        assert r.proxy.links_opened == links, "throttling made the source reconnect"
        print(f"throttled: {sent} B forwarded in {spent:.1f} s; source {conn}")
        r.finish()
        count("stalls")


@pytest.mark.parametrize("direction", ["up", "down"])
def test_corrupted_byte_is_detected_and_session_resumed(
        cluster: Cluster, tmp_path: Path, direction: str) -> None:
    seed = seed_for(1003)
    with rig(cluster, tmp_path, seed) as r:
        r.workload.wait_records(50)
        links = r.proxy.links_opened
        # A byte of a frame body, past the handshake: only the checksum can notice it.
        after = (r.proxy.stats["bytes_up"] if direction == "up"
                 else r.proxy.stats["bytes_down"]) + 2000
        c = r.proxy.corrupt("up" if direction == "up" else "down", after)
        wait_until(lambda: c.done, 60, what=f"the proxy to corrupt a {direction} byte")
        assert c.where == "body", c
        _wait_links(r.proxy, links + 1, 60, "the source to reconnect after the corruption")
        r.finish()
        detector, other = (r.target, r.source) if direction == "up" else (r.source, r.target)
        assert "frame checksum mismatch" in detector.log_text(), (
            f"the {detector.kind} agent did not log the checksum mismatch of the corrupted "
            f"{direction} frame ({c})")
        if direction == "up":
            # The target told the source why (ERROR), and the source logged it.
            assert "frame checksum mismatch" in other.log_text(), "the source was not told"
        count("corruptions")


# -- the long ones (make faults) --------------------------------------------------------------

@pytest.mark.faults_full
def test_half_open_link_is_detected_and_replaced(cluster: Cluster, tmp_path: Path) -> None:
    seed = seed_for(random.randrange(1 << 31))
    with rig(cluster, tmp_path, seed) as r:
        r.workload.wait_records(50)
        links = r.proxy.links_opened
        assert r.proxy.half_open() == 1
        # Nothing arrives and nothing closes: the source's 45 s idle timeout must notice,
        # and a new link must carry the rest.
        _wait_links(r.proxy, links + 1, 120, "the source to give up the frozen link")
        assert "no frame from the target" in r.source.log_text()
        r.workload.wait_records(50)
        r.finish()
        count("link_cuts")
        count("stalls")


@pytest.mark.faults_full
def test_stall_beyond_idle_timeout(cluster: Cluster, tmp_path: Path) -> None:
    seed = seed_for(random.randrange(1 << 31))
    with rig(cluster, tmp_path, seed) as r:
        r.workload.wait_records(50)
        links = r.proxy.links_opened
        r.proxy.stall(50)
        time.sleep(51)
        _wait_links(r.proxy, links + 1, 60, "the source to reconnect after a 50 s stall")
        r.finish()
        count("stalls")


@pytest.mark.faults_full
@pytest.mark.parametrize("run", range(4))
def test_chaos_mix(cluster: Cluster, tmp_path: Path, run: int) -> None:
    """Rounds of random chaos, corruption at any offset (headers included)."""
    seed = seed_for(random.randrange(1 << 31))
    rng = random.Random(seed)
    with rig(cluster, tmp_path, seed) as r:
        cuts = stalls = corruptions = 0
        for _ in range(10):
            r.workload.wait_records(20)
            kind = rng.choice(["cut", "cuts", "stall", "throttle", "delay", "corrupt"])
            print(f"round: {kind}")
            if kind == "cut":
                cuts += r.proxy.cut(rst=rng.random() < 0.5)
            elif kind == "cuts":
                before = r.proxy.stats["cuts"]
                r.proxy.cut_randomly(rng.uniform(0.5, 4))
                time.sleep(rng.uniform(1, 4))
                r.proxy.cut_randomly(None)
                cuts += r.proxy.stats["cuts"] - before
            elif kind == "stall":
                r.proxy.stall(rng.uniform(0.5, 8))
                stalls += 1
            elif kind == "throttle":
                r.proxy.throttle(rng.choice([20_000, 200_000, 2_000_000]))
            elif kind == "delay":
                r.proxy.delay(rng.choice([1, 10, 50, 200]))
            else:
                direction: Direction = "up" if rng.random() < 0.5 else "down"
                c = r.proxy.corrupt(direction, rng.randrange(1, 200_000), window=1,
                                    body_only=False)
                print(f"armed {c}")
                corruptions += 1
            time.sleep(rng.uniform(0.2, 2))
            r.calm()
        r.finish(settle_timeout=300)
        done = [c for c in r.proxy.corruptions if c.done]
        print(f"corruptions: {done}")
        count("link_cuts", cuts)
        count("stalls", stalls)
        count("corruptions", len(done))
