"""Prometheus /metrics on both agents, scraped while replication runs (issue 7 d)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from protocol.runtime.metrics import Scrape, answer
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
    t = metrics(tport)
    assert value(t, "mirrorline_applied_seq", conid="1", node="src1") == value(
        s, "mirrorline_captured_seq")
    assert value(t, "mirrorline_ops_applied_total", conid="1", node="src1") > 0
    assert value(t, "mirrorline_paused", conid="1", node="src1") == 0
    for port in (sport, tport):
        status, _ = scrape(port, "/nothing-here")
        assert status == 404
        status, _ = scrape(port, "/metrics/../x")
        assert status == 404

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
