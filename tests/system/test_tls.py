"""TLS between the agents: mutual, verified, under the key handshake (DESIGN §4).

Certificates come from trustme: one CA the agents trust, and another CA nobody here
trusts. The first tests drive protocol.runtime.tls in-process over loopback TCP; the
rest run the real daemons (FUSE mounts) and read their status and logs.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from protocol.runtime.stream import LinkError
from protocol.runtime.tls import (
    PlaintextPeerError,
    TLSConfigError,
    TLSHandshakeError,
    client_context,
    client_stream,
    server_context,
    server_stream,
)
from tests.system.harness import Agent, Cluster, diff_trees, replica_of, wait_synced, wait_until

pytestmark = [pytest.mark.system]


@dataclass
class Pki:
    ca: Path               # the CA both agents trust
    other_ca: Path         # a CA nobody here trusts
    target_cert: Path      # for 127.0.0.1 and localhost, signed by ca
    target_key: Path
    source_cert: Path      # client certificate signed by ca
    source_key: Path
    foreign_cert: Path     # client certificate signed by other_ca
    foreign_key: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "tls"
    d.mkdir()
    ca = trustme.CA(organization_name="Mirrorline test CA")
    other = trustme.CA(organization_name="Some other CA")

    def write(name: str, blob: trustme.Blob) -> Path:
        path = d / name
        blob.write_to_path(str(path))
        if name.endswith(".key"):
            path.chmod(0o600)
        return path

    target = ca.issue_cert("127.0.0.1", "localhost")
    source = ca.issue_cert("src1.mirrorline.test")
    foreign = other.issue_cert("src1.mirrorline.test")
    return Pki(ca=write("ca.pem", ca.cert_pem), other_ca=write("other-ca.pem", other.cert_pem),
               target_cert=write("target.pem", target.cert_chain_pems[0]),
               target_key=write("target.key", target.private_key_pem),
               source_cert=write("source.pem", source.cert_chain_pems[0]),
               source_key=write("source.key", source.private_key_pem),
               foreign_cert=write("foreign.pem", foreign.cert_chain_pems[0]),
               foreign_key=write("foreign.key", foreign.private_key_pem))


# -- contexts: errors name the key, the file and the problem ------------------------------

def test_context_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=f"tls_ca {missing}: No such file"):
        client_context(str(missing), str(pki.source_cert), str(pki.source_key))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=f"tls_cert {junk}: not a PEM file"):
        server_context(str(pki.ca), str(junk), str(pki.target_key))
    with pytest.raises(TLSConfigError, match=f"tls_key {pki.ca}: holds no PEM private key"):
        server_context(str(pki.ca), str(pki.target_cert), str(pki.ca))
    with pytest.raises(TLSConfigError, match=f"tls_key {pki.source_key} does not belong to "
                                             f"the certificate in tls_cert {pki.target_cert}"):
        server_context(str(pki.ca), str(pki.target_cert), str(pki.source_key))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match=f"tls_ca {broken}: not a valid PEM certificate"):
        client_context(str(broken), str(pki.source_cert), str(pki.source_key))
    with pytest.raises(TLSConfigError, match="tls = true needs tls_ca"):
        client_context(None, str(pki.source_cert), str(pki.source_key))
    ctx = client_context(str(pki.ca), str(pki.source_cert), str(pki.source_key))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert server_context(str(pki.ca), str(pki.target_cert),
                          str(pki.target_key)).verify_mode == ssl.CERT_REQUIRED


# -- handshakes over loopback, in-process -----------------------------------------------

async def _exchange(server_ctx: ssl.SSLContext | None, client_ctx: ssl.SSLContext | None,
                    server_name: str = "127.0.0.1") -> tuple[object, object]:
    """One connection; each side's outcome: the echoed bytes, or the exception."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    outcome: dict[str, object] = {}

    async def server() -> None:
        tcp = await listeners[0].accept()
        try:
            if server_ctx is None:   # a plaintext peer answering anything with junk
                await tcp.receive_some(100)
                await tcp.send_all(b"ML\x01\x09\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00")
                outcome["server"] = "plaintext"
                return
            link = await server_stream(tcp, server_ctx, peer="client", handshake_timeout=5)
            await link.send_all(await link.receive_some(100))
            outcome["server"] = link.version()
        except Exception as exc:
            outcome["server"] = exc
        finally:
            await trio.aclose_forcefully(tcp)

    async def client() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            if client_ctx is None:
                await tcp.send_all(b"ML hello in plaintext")
                outcome["client"] = await tcp.receive_some(100)
                return
            link = await client_stream(tcp, client_ctx, server_name, peer=f"127.0.0.1:{port}",
                                       handshake_timeout=5)
            await link.send_all(b"ping")
            outcome["client"] = await link.receive_some(100)
        except Exception as exc:
            outcome["client"] = exc
        finally:
            await trio.aclose_forcefully(tcp)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
    for listener in listeners:
        await listener.aclose()
    return outcome["server"], outcome["client"]


async def test_handshake_ok_is_tls13(pki: Pki) -> None:
    server, client = await _exchange(
        server_context(str(pki.ca), str(pki.target_cert), str(pki.target_key)),
        client_context(str(pki.ca), str(pki.source_cert), str(pki.source_key)))
    assert (server, client) == ("TLSv1.3", b"ping")


async def test_handshake_wrong_ca_is_clear_on_both_sides(pki: Pki) -> None:
    server, client = await _exchange(
        server_context(str(pki.ca), str(pki.target_cert), str(pki.target_key)),
        client_context(str(pki.other_ca), str(pki.source_cert), str(pki.source_key)))
    assert isinstance(client, TLSHandshakeError)
    assert "TLS handshake with 127.0.0.1:" in str(client)
    # OpenSSL says "unable to get local issuer certificate" or, when the target sends its
    # CA along, "self-signed certificate in certificate chain"; the hint is the same.
    assert "failed: certificate verify failed (" in str(client)
    assert ": the certificate is not signed by the CA in tls_ca)" in str(client)
    assert isinstance(server, TLSHandshakeError)
    assert "TLS handshake from client failed: the source refused this side's certificate " \
           "(tlsv1 alert unknown ca" in str(server)


async def test_handshake_client_cert_of_other_ca_is_refused(pki: Pki) -> None:
    server, client = await _exchange(
        server_context(str(pki.ca), str(pki.target_cert), str(pki.target_key)),
        client_context(str(pki.ca), str(pki.foreign_cert), str(pki.foreign_key)))
    assert isinstance(server, TLSHandshakeError)
    assert "certificate verify failed" in str(server), server
    # TLS 1.3: the client's handshake is over before the target checks its certificate;
    # the refusal is the first thing it reads (the sender turns that into a clear error).
    assert isinstance(client, (TLSHandshakeError, trio.BrokenResourceError)), client


async def test_handshake_wrong_name(pki: Pki) -> None:
    _, client = await _exchange(
        server_context(str(pki.ca), str(pki.target_cert), str(pki.target_key)),
        client_context(str(pki.ca), str(pki.source_cert), str(pki.source_key)),
        server_name="target.example")
    assert isinstance(client, TLSHandshakeError)
    assert "Hostname mismatch" in str(client) and "tls_server_name" in str(client)


async def test_plaintext_client_and_plaintext_server(pki: Pki) -> None:
    server, _ = await _exchange(
        server_context(str(pki.ca), str(pki.target_cert), str(pki.target_key)), None)
    assert isinstance(server, PlaintextPeerError)
    assert "did not start TLS" in str(server)
    _, client = await _exchange(
        None, client_context(str(pki.ca), str(pki.source_cert), str(pki.source_key)))
    assert isinstance(client, TLSHandshakeError) and not isinstance(client, PlaintextPeerError)
    assert "does not speak TLS" in str(client), client
    assert isinstance(client, LinkError)   # sorted with link errors, retried


# -- the real daemons -------------------------------------------------------------------

def _target_tls(pki: Pki) -> str:
    return "\n".join(["tls = true", f'tls_ca = "{pki.ca}"', f'tls_cert = "{pki.target_cert}"',
                      f'tls_key = "{pki.target_key}"'])


def _source_tls(source: Agent, ca: Path, cert: Path, key: Path) -> None:
    """TLS on the source's (last, here only) [[connection]]: its table ends the file."""
    with open(source.config_path, "a") as f:
        f.write(f'tls = true\ntls_ca = "{ca}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')


def _last_error(source: Agent) -> str:
    return str(source.status()["connections"][0]["last_error"])


class RecordingProxy:
    """Forwards a loopback port to the target and keeps every byte, both ways."""

    def __init__(self, upstream_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.upstream_port = upstream_port
        self.captured = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


@pytest.fixture
def proxy_factory() -> Iterator[list[RecordingProxy]]:
    proxies: list[RecordingProxy] = []
    yield proxies
    for p in proxies:
        p.close()


@pytest.mark.fuse
def test_replication_over_tls_is_encrypted(cluster: Cluster, tmp_path: Path, pki: Pki,
                                           proxy_factory: list[RecordingProxy]) -> None:
    target = cluster.target(extra=_target_tls(pki))
    target.start()
    proxy = RecordingProxy(target.extra["port"])
    proxy_factory.append(proxy)
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")],
                            via={1: f"127.0.0.1:{proxy.port}"})
    _source_tls(source, pki.ca, pki.source_cert, pki.source_key)
    source.start()
    marker = b"MIRRORLINE-WIRE-MARKER-" + os.urandom(8).hex().encode()
    (volume / "docs").mkdir()
    (volume / "docs" / "secret.txt").write_bytes(marker * 200)
    (volume / f"name-{marker.decode()}").write_bytes(b"x")
    for i in range(20):
        (volume / "docs" / f"f{i}").write_bytes(os.urandom(4096) + marker)
    os.rename(volume / "docs" / "f0", volume / "docs" / "g0")
    (volume / "docs" / "f1").unlink()
    wait_synced(source)
    assert diff_trees(volume, replica_of(target, "src1", "data")) == []
    conn = source.status()["connections"][0]
    assert conn["state"] == "replicating" and conn["last_error"] == ""
    assert "TLSv1.3" in target.log_text()
    with proxy.lock:
        wire = bytes(proxy.captured)
    assert len(wire) > 200 * len(marker)
    assert wire[0] == 0x16            # a TLS handshake record, not a Mirrorline frame
    assert marker not in wire and b"MIRRORLINE-WIRE-MARKER" not in wire
    assert b"docs" not in wire and b"src1" not in wire   # names and HELLO are hidden too


@pytest.mark.fuse
def test_refused_sources_and_the_target_keeps_serving(cluster: Cluster, tmp_path: Path,
                                                      pki: Pki) -> None:
    """Beside a good source: one that does not trust the target's CA, one whose client
    certificate comes from another CA, one without TLS. Each gets a clear error in its
    status and in the target's log; the good one replicates all along."""
    nodes = ["good", "wrongca", "foreign", "plain"]
    target = cluster.target(sources=nodes, extra=_target_tls(pki))
    target.start()
    sources: dict[str, tuple[Agent, Path]] = {}
    files = {"wrongca": (pki.other_ca, pki.source_cert, pki.source_key),
             "good": (pki.ca, pki.source_cert, pki.source_key),
             "foreign": (pki.ca, pki.foreign_cert, pki.foreign_key)}
    for node in nodes:
        volume = tmp_path / f"vol-{node}"
        source = cluster.source(node, volume, [(1, target, "data")])
        if node in files:
            _source_tls(source, *files[node])
        source.start()
        (volume / "hello.txt").write_bytes(f"from {node}\n".encode() * 100)
        sources[node] = (source, volume)
    wrongca, foreign, plain = (sources[n][0] for n in ("wrongca", "foreign", "plain"))
    wait_until(lambda: "the certificate is not signed by the CA in tls_ca" in
               _last_error(wrongca), what="the wrong-CA source's error")
    assert "certificate verify failed" in _last_error(wrongca)
    assert f"TLS handshake with 127.0.0.1:{target.extra['port']} failed" in _last_error(wrongca)
    wait_until(lambda: "the target refused this side's certificate" in _last_error(foreign),
               what="the foreign-certificate source's error")
    wait_until(lambda: "did not start TLS" in _last_error(plain), what="the plaintext error")
    for src in (wrongca, foreign, plain):
        conn = src.status()["connections"][0]
        assert conn["state"] == "error" and conn["acked_seq"] == 0, conn
    assert "certificate verify failed" in wrongca.log_text()
    # The good one went on, and goes on.
    good, good_volume = sources["good"]
    (good_volume / "later.txt").write_bytes(b"after the refusals\n")
    wait_synced(good)
    assert diff_trees(good_volume, replica_of(target, "good", "data")) == []
    for node in ("wrongca", "foreign", "plain"):
        assert not replica_of(target, node, "data").exists()
    log = target.log_text()
    assert "the source refused this side's certificate (tlsv1 alert unknown ca" in log
    assert "certificate verify failed" in log          # the foreign client certificate
    assert "the source did not start TLS, and this target has tls = true" in log
    assert target.status()["refused_sessions"] >= 3


@pytest.mark.fuse
def test_tls_source_to_plaintext_target(cluster: Cluster, tmp_path: Path, pki: Pki) -> None:
    target = cluster.target()
    target.start()
    source = cluster.source("src1", tmp_path / "vol", [(1, target, "data")])
    _source_tls(source, pki.ca, pki.source_cert, pki.source_key)
    source.start()
    wait_until(lambda: "does not speak TLS" in _last_error(source), what="the source's error")
    assert "this target has tls = false" in target.log_text()


def test_target_start_fails_on_a_bad_tls_file(tmp_path: Path, pki: Pki) -> None:
    cluster = Cluster(tmp_path)
    target = cluster.target(extra="\n".join([
        "tls = true", f'tls_ca = "{pki.ca}"', f'tls_cert = "{pki.target_cert}"',
        f'tls_key = "{pki.source_key}"']))
    target.start(wait=False)
    assert target.proc is not None
    # 1: refused at start; 2: refused by config validation (when it loads the files too).
    assert target.proc.wait(30) in (1, 2)
    assert (f"tls_key {pki.source_key} does not belong to the certificate in tls_cert "
            f"{pki.target_cert}") in target.log_text()
