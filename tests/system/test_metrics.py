"""Prometheus /metrics on both agents, scraped while replication runs (issue 7 d)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from protocol.runtime.metrics import Histogram, Scrape, answer
from tests.system.harness import Cluster, free_port, wait_synced, wait_until

pytestmark = [pytest.mark.system, pytest.mark.fuse]

Samples = dict[str, list[tuple[dict[str, str], float]]]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> Samples:
    """Every line is a comment or ``name{labels} value``; fail on anything else."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert not line or line.startswith(("# HELP ", "# TYPE ")), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value = m.groups()
        labels: dict[str, str] = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
        out.setdefault(name, []).append((labels, float(value)))
    return out


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for lab, v in samples.get(name, [])
             if all(lab.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {sorted(samples)}"
    return found[0]


def metrics(port: int) -> Samples:
    status, text = scrape(port)
    assert status == 200, text
    return parse(text)


def histogram_count(samples: Samples, name: str, **labels: str) -> float:
    """``name``'s ``_count``, after checking the histogram is well formed: cumulative
    buckets, ``+Inf`` last and equal to ``_count``, and a ``_sum``."""
    buckets = [(lab["le"], v) for lab, v in samples.get(name + "_bucket", [])
               if all(lab.get(k) == want for k, want in labels.items())]
    assert buckets and buckets[-1][0] == "+Inf", buckets
    bounds = [float(le) for le, _ in buckets]
    counts = [v for _, v in buckets]
    assert bounds == sorted(bounds) and counts == sorted(counts), buckets
    count = value(samples, name + "_count", **labels)
    assert counts[-1] == count, (buckets, count)
    assert value(samples, name + "_sum", **labels) >= 0
    return count


def test_render_and_answer_without_agents() -> None:
    s = Scrape()
    s.gauge("lag_ops", "help \\ with\nnewline", 3, conid=1, volume="v\"1")
    s.counter("reconnects", "Sessions ended.", 2.5, conid=1, reason="error")
    samples = parse(s.render().decode())
    assert value(samples, "mirrorline_lag_ops", conid="1") == 3
    assert value(samples, "mirrorline_reconnects_total", reason="error") == 2.5
    with pytest.raises(ValueError):
        s.gauge("x", "h", 1, path="/a/b")    # unbounded label values are refused
    assert answer(b"GET /other HTTP/1.0\r\n\r\n", lambda sc: None).startswith(
        b"HTTP/1.0 404")
    assert answer(b"POST /metrics HTTP/1.0\r\n\r\n", lambda sc: None).startswith(
        b"HTTP/1.0 405")
    assert answer(None, lambda sc: None).startswith(b"HTTP/1.0 431")


def test_histogram_renders_cumulative_buckets() -> None:
    h = Histogram()
    for seconds in (0.0002, 0.003, 0.003, 0.7, 30.0):
        h.observe(seconds)
    s = Scrape()
    s.histogram("fsync_seconds", "Fsyncs.", h, volume="data")
    samples = parse(s.render().decode())
    assert histogram_count(samples, "mirrorline_fsync_seconds", volume="data") == 5
    assert value(samples, "mirrorline_fsync_seconds_bucket", le="0.0005") == 1
    assert value(samples, "mirrorline_fsync_seconds_bucket", le="0.005") == 3
    assert value(samples, "mirrorline_fsync_seconds_bucket", le="10") == 4
    assert value(samples, "mirrorline_fsync_seconds_sum") == pytest.approx(30.7062)
    assert h.snapshot()[3] == 30.0          # the recent maximum
    with pytest.raises(ValueError):
        s.histogram("x_seconds", "h", h, le="1")    # only the histogram sets le


def test_metrics_move_with_replication(cluster: Cluster, tmp_path: Path) -> None:
    sport, tport = free_port(), free_port()
    target = cluster.target(extra=f'metrics = "127.0.0.1:{tport}"')
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")],
                            extra=f'metrics = "127.0.0.1:{sport}"')
    source.start()
    (volume / "first").write_bytes(b"x" * 4096)
    wait_synced(source)

    conn = {"conid": "1", "volume": "data"}
    s = metrics(sport)
    assert value(s, "mirrorline_connection_state", state="replicating", **conn) == 1
    assert value(s, "mirrorline_connection_state", state="error", **conn) == 0
    assert value(s, "mirrorline_lag_ops", **conn) == 0
    assert value(s, "mirrorline_acked_seq", **conn) == value(s, "mirrorline_captured_seq")
    assert value(s, "mirrorline_sent_bytes_total", **conn) > 0
    assert value(s, "mirrorline_last_ack_timestamp_seconds", **conn) > 0
    assert value(s, "mirrorline_sent_ops_total", **conn) >= 1
    assert value(s, "mirrorline_sent_wire_bytes_total", **conn) > 0
    assert value(s, "mirrorline_journal_appended_bytes_total", volume="data") >= 4096
    assert "mirrorline_bandwidth_limit_bytes" not in s     # no limit, no sample
    fsyncs = histogram_count(s, "mirrorline_journal_fsync_seconds", volume="data")
    assert value(s, "mirrorline_journal_fsync_max_seconds", volume="data") >= 0
    t = metrics(tport)
    replica = {"conid": "1", "node": "src1"}
    assert value(t, "mirrorline_applied_seq", **replica) == value(
        s, "mirrorline_captured_seq")
    assert value(t, "mirrorline_ops_applied_total", **replica) > 0
    assert value(t, "mirrorline_paused", **replica) == 0
    checkpoints = histogram_count(t, "mirrorline_checkpoint_seconds", **replica)
    assert checkpoints >= 1
    assert histogram_count(t, "mirrorline_checkpoint_fsync_seconds", **replica) == checkpoints
    assert 0 < value(t, "mirrorline_checkpoint_max_seconds", **replica) < 60
    # Labels stay a small fixed set: nothing names a path, a peer address or an op.
    for samples in (s, t):
        for name, found in samples.items():
            for labels, _ in found:
                assert set(labels) <= {"conid", "volume", "node", "state", "reason",
                                       "result", "le"}, (name, labels)
    for port in (sport, tport):
        status, _ = scrape(port, "/nothing-here")
        assert status == 404
        status, _ = scrape(port, "/metrics/../x")
        assert status == 404

    # More replication: the target counts more checkpoints (and their fsyncs).
    (volume / "second").write_bytes(b"y" * 4096)
    wait_synced(source)
    t = metrics(tport)
    assert histogram_count(t, "mirrorline_checkpoint_seconds", **replica) > checkpoints
    assert histogram_count(t, "mirrorline_checkpoint_fsync_seconds", **replica) > checkpoints

    # Target down: writes queue up in the journal and the lag grows.
    target.stop()
    for i in range(20):
        (volume / f"f{i}").write_bytes(bytes([i]) * 65536)
    s = wait_until(lambda: (m := metrics(sport)) and value(
        m, "mirrorline_lag_seconds", **conn) > 0 and m, what="lag seconds > 0")
    assert value(s, "mirrorline_lag_ops", **conn) > 0
    assert value(s, "mirrorline_lag_bytes", **conn) > 0
    assert value(s, "mirrorline_journal_disk_bytes", volume="data") > 0
    assert value(s, "mirrorline_captured_seq", volume="data") > value(
        s, "mirrorline_acked_seq", **conn)
    s = wait_until(lambda: (m := metrics(sport)) and value(
        m, "mirrorline_reconnects_total", reason="disconnected", **conn) > 0 and m,
        what="a counted reconnect")
    assert value(s, "mirrorline_connection_state", state="replicating", **conn) == 0
    assert value(s, "mirrorline_last_error_timestamp_seconds", **conn) > 0
    # The flusher fsyncs the journal within a second of the writes.
    wait_until(lambda: histogram_count(metrics(sport), "mirrorline_journal_fsync_seconds",
                                       volume="data") > fsyncs, what="a counted fsync")

    # Target back: everything drains and the lag returns to zero.
    target.start()
    wait_synced(source)
    s = wait_until(lambda: (m := metrics(sport)) and value(
        m, "mirrorline_lag_ops", **conn) == 0 and m, what="lag ops back to 0")
    assert value(s, "mirrorline_lag_bytes", **conn) == 0
    assert value(s, "mirrorline_lag_seconds", **conn) == 0
    assert value(s, "mirrorline_connection_state", state="replicating", **conn) == 1
    t = metrics(tport)
    assert value(t, "mirrorline_applied_seq", conid="1", node="src1") == value(
        s, "mirrorline_captured_seq", volume="data")
    assert value(t, "mirrorline_ops_applied_total", conid="1", node="src1") > 0
    assert value(t, "mirrorline_bytes_applied_total", conid="1", node="src1") >= 20 * 65536
    assert value(t, "mirrorline_last_checkpoint_timestamp_seconds", conid="1",
                 node="src1") > 0
    # A restarted target counts its checkpoints from zero: these are the new ones.
    assert histogram_count(t, "mirrorline_checkpoint_seconds", **replica) >= 1
    assert value(s, "mirrorline_sent_ops_total", **conn) >= 21
    # The error that ended the sessions is kept, with its time, after recovery.
    assert value(s, "mirrorline_last_error_timestamp_seconds", **conn) > 0
