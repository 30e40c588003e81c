"""TLS termination on a listener (`tls = { cert, key }`)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.support import Backend, Lbproxy, proxy_config

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def test_tls_listener_terminates_and_forwards(tmp_path: Path) -> None:
    cert, _key = self_signed(tmp_path)
    backend = Backend("t1").start()
    try:
        text, port, _ = proxy_config([(backend.id, backend.address)])
        # relative paths resolve against the config file's directory
        text = text.replace(
            'pool = "main"\n', 'pool = "main"\ntls = { cert = "cert.pem", key = "key.pem" }\n', 1
        )
        lb = Lbproxy(text, tmp_path).start(wait_ports=(port,))
        try:
            context = ssl.create_default_context(cafile=str(cert))
            with httpx.Client(verify=context) as client:
                response = client.get(f"https://127.0.0.1:{port}/headers")
                assert response.status_code == 200
                headers = {k.lower(): v for k, v in response.json()}
                assert headers["x-forwarded-proto"] == "https"
                assert client.get(f"https://127.0.0.1:{port}/whoami").json()["id"] == "t1"
            with ws_connect(f"wss://127.0.0.1:{port}/echo", ssl=context) as ws:
                ws.send("over tls")
                assert ws.recv(timeout=5) == "over tls"
            # plain HTTP on the TLS port does not get through
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/whoami", timeout=3)
        finally:
            lb.stop()
    finally:
        backend.stop()


def test_tls_websocket_close_and_drain_are_prompt(tmp_path: Path) -> None:
    """TLS cannot half-close: the tunnel must close instead of waiting for a FIN it cannot send."""
    import time

    from websockets.exceptions import ConnectionClosed

    cert, _key = self_signed(tmp_path)
    backend = Backend("t2").start()
    try:
        text, port, admin = proxy_config(
            [(backend.id, backend.address)], pool={"drain_timeout": 0.2, "close_spread": 0.0}
        )
        text = text.replace(
            'pool = "main"\n', 'pool = "main"\ntls = { cert = "cert.pem", key = "key.pem" }\n', 1
        )
        lb = Lbproxy(text, tmp_path).start(wait_ports=(port,))
        try:
            context = ssl.create_default_context(cafile=str(cert))
            started = time.monotonic()
            with ws_connect(
                f"wss://127.0.0.1:{port}/echo", ssl=context, open_timeout=20, close_timeout=5
            ) as ws:
                ws.send("x")
                assert ws.recv(timeout=5) == "x"
            assert time.monotonic() - started < 2  # the close handshake did not hang
            with ws_connect(f"wss://127.0.0.1:{port}/echo", ssl=context) as ws:
                url = f"http://127.0.0.1:{admin}/api/pools/main/backends/t2/drain"
                assert httpx.post(url).status_code == 202
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        finally:
            lb.stop()
    finally:
        backend.stop()
