"""``simsiam-kit serve`` as a process on loopback: the bind address, a client that disconnects mid-upload,
memory under a stream of bad requests (measured), a bounded load of concurrent searches, and the command's
own checks (the missing extra named)."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import sys
import threading
import time
import zlib
from urllib.parse import urlsplit

import pytest

from helpers import cli

pytest.importorskip("fastapi")  # the [serve] extra


def post_image(base: str, data: bytes, k: int = 5, path: str = "/search", name: str = "q.jpg", timeout: float = 30):
    """POST ``data`` as the multipart field 'image'; returns (status, parsed JSON)."""
    u = urlsplit(base)
    boundary = "simsiamkitboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", f"{path}?k={k}", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def get_json(base: str, path: str):
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _bomb_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _disconnect_mid_upload(base: str, declared: int = 900_000, sent: int = 20_000) -> None:
    u = urlsplit(base)
    s = socket.create_connection((u.hostname, u.port), timeout=5)
    head = (
        "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {declared}\r\n\r\n"
        '--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    )
    s.sendall(head.encode() + b"\xff" * sent)
    s.close()


def _declared_too_large(base: str, declared: int = 1_200_000) -> int:
    """Headers of an upload over --max-upload-mb, no body: the server answers (413) without reading it."""
    u = urlsplit(base)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(
            "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {declared}\r\n\r\n".encode()
        )
        chunks = []
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            chunks.append(chunk)
        reply = b"".join(chunks).decode("latin-1")
    status = int(reply.split()[1])
    assert "--max-upload-mb" in reply.split("\r\n\r\n", 1)[1]
    return status


def test_binds_loopback_by_default(photo_server):
    base, proc, log = photo_server
    port = urlsplit(base).port
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # LISTEN
                listening.add(addr)
    assert listening == {"0100007F"}, listening  # 127.0.0.1 only
    assert f"http://127.0.0.1:{port}/" in log.read_text()


def test_client_disconnecting_mid_upload_does_not_stop_the_server(photo_server, photos):
    base, proc, _ = photo_server
    for _ in range(5):
        _disconnect_mid_upload(base)
    status, body = post_image(base, photos[3].read_bytes(), k=3)
    assert status == 200 and body["neighbours"][0]["id"] == photos[3].name
    assert proc.poll() is None


def test_memory_stays_bounded_under_bad_requests(photo_server, photos):
    base, proc, _ = photo_server
    good = photos[0].read_bytes()
    for _ in range(10):  # warm: code paths, caches, allocator pools
        assert post_image(base, good)[0] == 200
        post_image(base, b"\0" * 900_000, name="zeros.bin")
    before = rss_mb(proc.pid)
    statuses = set()
    for _ in range(30):
        statuses.add(post_image(base, b"\0" * 900_000, name="zeros.bin")[0])  # non-image, near the limit
        statuses.add(post_image(base, _bomb_png(), name="bomb.png")[0])
        statuses.add(_declared_too_large(base))  # over --max-upload-mb 1
        statuses.add(post_image(base, good[: len(good) // 2])[0])  # truncated JPEG
        _disconnect_mid_upload(base)
    after = rss_mb(proc.pid)
    print(f"server RSS {before:.1f} MB -> {after:.1f} MB after 150 bad requests")
    assert statuses == {400, 413}
    assert after - before < 40, (before, after)
    assert post_image(base, good)[0] == 200


@pytest.mark.parametrize("server", ["photo_server", "photo_server_batching"])
def test_bounded_load_of_concurrent_searches(server, photos, request):
    """4 clients x 25 searches on loopback, without and with dynamic batching: every answer correct (the photo
    itself first)."""
    base, proc, _ = request.getfixturevalue(server)
    calls0 = get_json(base, "/healthz")[1]["encoder_calls"]
    clients, per_client = 4, 25
    errors, latencies = [], []
    queries = [(p.name, p.read_bytes()) for p in photos[: clients * 2]]

    def client(c):
        for i in range(per_client):
            name, data = queries[(c * 2 + i) % len(queries)]
            t0 = time.perf_counter()
            status, body = post_image(base, data, k=5)
            latencies.append(time.perf_counter() - t0)
            if status != 200 or body["neighbours"][0]["id"] != name:
                errors.append((status, name, body))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "load test did not finish in 120 s"
    assert not errors, errors[:3]
    assert len(latencies) == clients * per_client
    status, health = get_json(base, "/healthz")
    calls = health["encoder_calls"] - calls0
    print(f"{server}: {clients * per_client} searches in {wall:.2f} s, {calls} encoder calls")
    assert status == 200 and 1 <= calls <= clients * per_client
    if health["batching"]:
        assert server == "photo_server_batching"
    else:
        assert calls == clients * per_client


def test_serve_without_the_extra_names_it(photo_index, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    r = cli("serve", "--index", photo_index)
    assert r.exit_code == 2 and "pip install -e '.[serve]'" in r.output and "fastapi" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--index", "/nonexistent/emb"], "no embed.json"),
        (["--max-k", "0"], "--max-k 0 must be in [1, 10000]"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0.0 must be in (0, 1024]"),
        (["--batch-wait-ms", "5000"], "--batch-wait-ms 5000.0 must be in [0, 1000]"),
        (["--model", "/nonexistent/m.onnx"], "--model /nonexistent/m.onnx: no such file"),
    ],
)
def test_serve_bad_options(photo_index, args, message):
    argv = ["serve"] + (args if args[0] == "--index" else ["--index", str(photo_index), *args])
    r = cli(*argv)
    assert r.exit_code == 2 and message in r.output, r.output


def test_a_host_beyond_loopback_is_warned_about(photo_index, monkeypatch):
    import uvicorn

    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.serve.server import run_server

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: ran.append(self.config.host))  # nothing is bound
    said = []
    run_server(photo_index, lambda p: OnnxEmbedder(p, threads=1), host="0.0.0.0", port=8123, log=said.append)
    assert ran == ["0.0.0.0"] and "http://0.0.0.0:8123/" in said[0]
    assert "no authentication" in said[1] and "reverse proxy" in said[1]
    said.clear()
    run_server(photo_index, lambda p: OnnxEmbedder(p, threads=1), log=said.append)
    assert ran[-1] == "127.0.0.1" and len(said) == 1
