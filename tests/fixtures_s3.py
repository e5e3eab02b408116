"""A real S3 protocol server for tests: moto in server mode, with IAM authentication on, and a
proxy in front of it that injects faults.

Import the fixtures into a test module: ``from fixtures_s3 import moto_server, s3_env, ...``.
Everything listens on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from grpo_trainer.storage import LocalStorage, MiB, S3Options, S3Storage, Storage, open_storage

REGION = "us-east-1"

# Runs in a child process, so moto's global state (IAM auth switched on, backends) never meets a
# test that uses moto's in-process mocks; reading stdin until EOF ties its life to ours.
_SERVE = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class MotoServer:
    endpoint: str
    admin: Credentials
    """May do anything."""
    reader: Credentials
    """May list and get objects, nothing else."""

    def client(self, credentials: Credentials | None = None, endpoint: str | None = None):
        """A plain boto3 S3 client, for looking at or tampering with what the server holds."""
        import boto3

        credentials = credentials or self.admin
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
        )


def _iam_user(iam, name: str, actions: list[str]) -> Credentials:
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 (and IAM) on a free localhost port, checking signatures and IAM policies."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True
        )
    try:
        port = process.stdout.readline().strip()
        if not port:
            pytest.fail(f"moto server did not start (exit status {process.wait()}); see {log}")
        endpoint = f"http://127.0.0.1:{port}"
        # Auth is off until the users exist; then every request must be signed by one of them.
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        admin = _iam_user(iam, "admin", ["*"])
        # s3:ListBucket is AWS's IAM action for listing; moto 5.2.6 checks the operation's own name
        # (s3:ListObjectsV2) instead, so the reader holds both and means the same either way.
        reader = _iam_user(iam, "reader", ["s3:ListBucket", "s3:ListObjectsV2", "s3:GetObject"])
        switch_on_auth = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
        )
        urllib.request.urlopen(switch_on_auth).close()
        yield MotoServer(endpoint, admin, reader)
    finally:
        process.stdin.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """The process environment of a trainer whose credentials secret holds the admin's keys, and
    nothing else of AWS's: no profile, config file, instance metadata or endpoint override."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.admin.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.admin.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_server


@pytest.fixture
def bucket(s3_env: MotoServer) -> str:
    """A new, empty bucket."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------------------ fault proxy

RequestMatcher = Callable[[str, str], bool]
"""Whether a request, given its method and path with query, is one a fault applies to."""


def any_request(method: str, path: str) -> bool:
    return True


def upload_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


def complete_multipart_upload(method: str, path: str) -> bool:
    return method == "POST" and "uploadId=" in path


def get_object(method: str, path: str) -> bool:
    return method == "GET" and "?" not in path


@dataclass
class _Fault:
    times: int
    when: RequestMatcher
    status: int | None = None
    stall_seconds: float | None = None


# Headers about one hop of the connection, not the request; Expect is answered by the proxy.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"
}

_ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


class FaultProxy:
    """An HTTP proxy in front of the moto server that fails or stalls chosen requests.

    ``fail`` answers the next matching requests with a 5xx S3 error instead of forwarding them;
    ``stall`` holds them for some seconds and then drops the connection unanswered, as a request
    lost in the network is.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request received, in order."""
        self.injected = 0
        """Faults injected so far."""
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        proxy = self

        class Handler(_ProxyHandler):
            def _proxy(self) -> FaultProxy:
                return proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(self, times: int, status: int = 503, when: RequestMatcher = any_request) -> None:
        with self._lock:
            self._faults.append(_Fault(times, when, status=status))

    def stall(self, times: int, seconds: float, when: RequestMatcher = any_request) -> None:
        with self._lock:
            self._faults.append(_Fault(times, when, stall_seconds=seconds))

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self._faults:
                if fault.times > 0 and fault.when(method, path):
                    fault.times -= 1
                    self.injected += 1
                    return fault
        return None


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for botocore's Expect header

    def _proxy(self) -> FaultProxy:
        raise NotImplementedError

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = self._proxy()._take_fault(self.command, self.path)
        if fault and fault.stall_seconds is not None:
            self._proxy()._released.wait(fault.stall_seconds)
            self.close_connection = True
        elif fault:
            self._respond_error(fault.status or 503)
        else:
            self._forward(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _respond_error(self, status: int) -> None:
        code = _ERROR_CODES.get(status, "InternalError")
        body = b"" if self.command == "HEAD" else (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            "<Message>fault injected by the test proxy</Message></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, body: bytes) -> None:
        upstream = urlsplit(self._proxy().upstream)
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        try:
            # Host travels unchanged: the request's signature covers it.
            headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    """An in-process fake S3 (moto's mock, no server) with the buckets grpo-data and grpo-models,
    for code paths that only need S3 to answer; faults need the server fixtures above."""
    import boto3
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        for bucket_name in ("grpo-data", "grpo-models"):
            client.create_bucket(Bucket=bucket_name)
        yield client


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the moto server, injecting nothing until told to."""
    proxy = FaultProxy(moto_server.endpoint)
    yield proxy
    proxy.close()


# ------------------------------------------------------------- one store, on each backend

# Small parts (S3's minimum) so a 12 MiB file is a 3-part upload; short timeouts so faults are quick.
FAST = S3Options(max_attempts=4, connect_timeout=1, read_timeout=2, multipart_chunksize=5 * MiB, max_concurrency=4)
MULTIPART_SIZE = 12 * MiB


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same checkpoint store, on each backend."""
    if request.param == "file":
        return open_storage(f"file://{tmp_path / 'store'}")
    name = request.getfixturevalue("bucket")
    server: MotoServer = request.getfixturevalue("moto_server")
    return open_storage(f"s3://{name}/runs/demo", endpoint_url=server.endpoint, s3_options=FAST)


def corrupt(storage: Storage, key: str, server: MotoServer) -> None:
    """Flip one byte of a stored object behind the storage layer's back."""
    if isinstance(storage, LocalStorage):
        path = storage.root / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(data)
        return
    assert isinstance(storage, S3Storage)
    client = server.client()
    full_key = f"{storage.prefix}/{key}"
    data = bytearray(client.get_object(Bucket=storage.bucket, Key=full_key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=storage.bucket, Key=full_key, Body=bytes(data))
