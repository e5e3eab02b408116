"""The storage layer, against a local directory and against moto's S3 server (with IAM auth on),
behind a proxy that injects 5xx responses and timeouts where a test asks for them."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures_s3 import FAST, MULTIPART_SIZE, FaultProxy, MotoServer, complete_multipart_upload, corrupt, get_object, upload_part

import grpo_trainer.storage
from grpo_trainer.storage import (
    PARTIAL_PREFIX,
    CredentialsError,
    IntegrityError,
    LocalStorage,
    MiB,
    NotFoundError,
    S3Storage,
    Storage,
    StorageError,
    StorageFullError,
    UnreachableError,
    open_storage,
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_checkpoint(root: Path, big: int = 256 * 1024) -> Path:
    """A checkpoint-like directory: weights, json files, a nested folder, an empty file, unicode."""
    files = {
        "model.safetensors": os.urandom(big),
        "config.json": b'{"hidden_size": 64}',
        "optimizer/rank-0/état-ünïcode.pt": os.urandom(1000),
        "empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ---------------------------------------------------------------------------- both backends


def test_a_directory_round_trips(storage: Storage, tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "source")

    uploaded = storage.upload_dir(source, "step-000050")

    expected = {path.relative_to(source).as_posix(): path for path in source.rglob("*") if path.is_file()}
    assert {(f.key, f.size, f.sha256) for f in uploaded} == {
        (f"step-000050/{rel}", path.stat().st_size, sha256_of(path)) for rel, path in expected.items()
    }
    assert [(obj.key, obj.size) for obj in storage.list_objects("step-000050")] == sorted(
        (f"step-000050/{rel}", path.stat().st_size) for rel, path in expected.items()
    )

    target = tmp_path / "restored"
    downloaded = storage.download_dir("step-000050", target)
    for rel, path in expected.items():
        assert (target / rel).read_bytes() == path.read_bytes()
    assert {f.sha256 for f in downloaded} == {f.sha256 for f in uploaded}
    assert not list(target.rglob(f"{PARTIAL_PREFIX}*"))


def test_listing_is_by_folder_and_sorted(storage: Storage) -> None:
    for key in ("step-10/b", "step-1/a", "step-2/c", "step-1/sub/d"):
        storage.put_bytes(key, key.encode())

    assert [obj.key for obj in storage.list_objects("step-1")] == ["step-1/a", "step-1/sub/d"]
    assert [obj.key for obj in storage.list_objects()] == ["step-1/a", "step-1/sub/d", "step-10/b", "step-2/c"]
    assert storage.list_objects("step-3") == []


def test_put_overwrite_exists_delete(storage: Storage) -> None:
    assert not storage.exists("step-1/manifest.json")
    storage.put_bytes("step-1/manifest.json", b"first")
    storage.put_bytes("step-1/manifest.json", b"second, longer")

    assert storage.exists("step-1/manifest.json")
    assert storage.get_bytes("step-1/manifest.json") == b"second, longer"
    assert [obj.size for obj in storage.list_objects("step-1")] == [len(b"second, longer")]

    storage.delete("step-1/manifest.json")
    storage.delete("step-1/manifest.json")  # deleting what is gone is fine
    assert not storage.exists("step-1/manifest.json")
    with pytest.raises(NotFoundError, match="step-1/manifest.json"):
        storage.get_bytes("step-1/manifest.json")


def test_an_uploaded_file_overwrites(storage: Storage, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"a" * 100)
    second.write_bytes(b"b" * 10)

    storage.upload_file(first, "weights.bin")
    storage.upload_file(second, "weights.bin")

    assert storage.get_bytes("weights.bin") == b"b" * 10


def test_delete_prefix_deletes_one_folder(storage: Storage) -> None:
    for key in ("step-1/a", "step-1/sub/b", "step-10/c"):
        storage.put_bytes(key, b"x")

    assert storage.delete_prefix("step-1") == 2

    assert [obj.key for obj in storage.list_objects()] == ["step-10/c"]
    assert storage.delete_prefix("step-1") == 0
    with pytest.raises(ValueError, match="refusing"):
        storage.delete_prefix("")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../escape", "a/./b", "trailing/"])
def test_malformed_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put_bytes(key, b"x")


def test_check_access_passes_on_a_usable_store(storage: Storage) -> None:
    storage.check_access()
    storage.check_access(write=False)
    assert storage.list_objects() == []  # the write probe is gone


def test_a_corrupted_object_is_detected(storage: Storage, tmp_path: Path, moto_server: MotoServer) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(os.urandom(64 * 1024))
    uploaded = storage.upload_file(source, "step-1/model.safetensors")
    assert uploaded.sha256 == sha256_of(source)

    corrupt(storage, "step-1/model.safetensors", moto_server)

    target = tmp_path / "restored" / "model.safetensors"
    with pytest.raises(IntegrityError, match="step-1/model.safetensors is corrupt"):
        storage.download_file("step-1/model.safetensors", target, sha256=uploaded.sha256)
    assert not target.exists()
    assert not list(target.parent.iterdir())  # no temporary file left either
    with pytest.raises(IntegrityError):
        storage.download_dir("step-1", tmp_path / "again", sha256={"model.safetensors": uploaded.sha256})


def test_download_dir_requires_every_expected_file(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("step-1/config.json", b"{}")
    expected = {"config.json": hashlib.sha256(b"{}").hexdigest(), "model.safetensors": "0" * 64}

    with pytest.raises(NotFoundError, match="step-1/model.safetensors"):
        storage.download_dir("step-1", tmp_path / "restored", sha256=expected)


# A trainer uploading a checkpoint whose source is a FIFO, so the test decides how far it gets.
_UPLOADER = """
import sys
from grpo_trainer.storage import MiB, S3Options, open_storage
uri, endpoint, source = sys.argv[1:]
storage = open_storage(uri, endpoint_url=endpoint or None, s3_options=S3Options(multipart_chunksize=5 * MiB))
storage.upload_file(source, "step-1/model.safetensors")
"""


def test_an_upload_killed_midway_leaves_no_object(storage: Storage, tmp_path: Path, moto_server: MotoServer) -> None:
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    endpoint = storage.endpoint_url if isinstance(storage, S3Storage) else None
    uploader = subprocess.Popen(
        [sys.executable, "-c", _UPLOADER, storage.uri, endpoint or "", str(fifo)], stderr=subprocess.PIPE
    )
    try:
        with open_fifo_for_writing(fifo, uploader) as pipe:
            pipe.write(os.urandom(11 * MiB))  # two 5 MiB parts and then some; the rest never comes
            pipe.flush()
            wait_until_midway(storage, moto_server)
            uploader.kill()
            uploader.wait()
    finally:
        uploader.kill()
        uploader.wait()

    assert not storage.exists("step-1/model.safetensors")
    assert storage.list_objects() == []
    # Deleting the checkpoint's folder also clears what the killed writer left (temp file, parts).
    storage.delete_prefix("step-1")
    assert not pending_leftovers(storage, moto_server)
    # And the next attempt at the same checkpoint goes through.
    (tmp_path / "small").write_bytes(b"weights")
    storage.upload_file(tmp_path / "small", "step-1/model.safetensors")
    assert storage.get_bytes("step-1/model.safetensors") == b"weights"


def open_fifo_for_writing(fifo: Path, reader: subprocess.Popen, timeout: float = 30):
    """Open the FIFO once the reader has, without hanging if the reader dies first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            if reader.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the uploader never opened its source: {reader.stderr.read().decode()}")
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "wb")


def wait_until_midway(storage: Storage, server: MotoServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pending_leftovers(storage, server, with_parts=True):
        assert time.monotonic() < deadline, "the upload never got under way"
        time.sleep(0.05)


def pending_leftovers(storage: Storage, server: MotoServer, with_parts: bool = False) -> bool:
    """Whether the killed writer's traces are there: a temporary file, or an unfinished multipart
    upload (with at least one part, if ``with_parts``)."""
    if isinstance(storage, LocalStorage):
        return any(path.stat().st_size > 0 for path in storage.root.rglob(f"{PARTIAL_PREFIX}*"))
    assert isinstance(storage, S3Storage)
    client = server.client()
    uploads = client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    if not with_parts:
        return bool(uploads)
    return any(
        client.list_parts(Bucket=storage.bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts")
        for upload in uploads
    )


# ----------------------------------------------------------------------------------- s3 only


def test_a_large_file_goes_up_in_parts(bucket: str, moto_server: MotoServer, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{bucket}/runs", endpoint_url=moto_server.endpoint, s3_options=FAST)
    source = tmp_path / "model.safetensors"
    source.write_bytes(os.urandom(MULTIPART_SIZE))

    uploaded = storage.upload_file(source, "step-1/model.safetensors")

    etag = moto_server.client().head_object(Bucket=bucket, Key="runs/step-1/model.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3")  # a 3-part multipart upload
    assert (uploaded.size, uploaded.sha256) == (MULTIPART_SIZE, sha256_of(source))
    restored = storage.download_file("step-1/model.safetensors", tmp_path / "restored", sha256=uploaded.sha256)
    assert restored.path.read_bytes() == source.read_bytes()


def proxied(bucket: str, proxy: FaultProxy, **options: float) -> Storage:
    return open_storage(f"s3://{bucket}/runs", endpoint_url=proxy.endpoint, s3_options=replace(FAST, **options))


def test_5xx_responses_are_retried(bucket: str, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "source", big=MULTIPART_SIZE)
    storage = proxied(bucket, fault_proxy)
    fault_proxy.fail(2, 503, when=lambda method, path: upload_part(method, path) and "partNumber=2" in path)
    fault_proxy.fail(1, 500, when=complete_multipart_upload)
    fault_proxy.fail(1, 503, when=get_object)
    fault_proxy.fail(1, 500)  # whatever request comes next

    uploaded = storage.upload_dir(source, "step-1")
    downloaded = storage.download_dir("step-1", tmp_path / "restored", sha256={
        f.key.removeprefix("step-1/"): f.sha256 for f in uploaded
    })

    assert fault_proxy.injected == 5
    assert sorted(f.sha256 for f in downloaded) == sorted(sha256_of(p) for p in source.rglob("*") if p.is_file())


def test_timeouts_are_retried(bucket: str, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(os.urandom(MULTIPART_SIZE))
    storage = proxied(bucket, fault_proxy, read_timeout=0.5)
    fault_proxy.stall(1, seconds=1, when=upload_part)
    fault_proxy.stall(1, seconds=1, when=get_object)

    uploaded = storage.upload_file(source, "model.safetensors")
    restored = storage.download_file("model.safetensors", tmp_path / "restored", sha256=uploaded.sha256)

    assert fault_proxy.injected == 2
    assert restored.sha256 == sha256_of(source)


def test_an_upload_that_keeps_failing_leaves_nothing(
    bucket: str, fault_proxy: FaultProxy, moto_server: MotoServer, tmp_path: Path
) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(os.urandom(MULTIPART_SIZE))
    storage = proxied(bucket, fault_proxy, max_attempts=2)
    fault_proxy.fail(1000, 500, when=lambda method, path: upload_part(method, path) and "partNumber=2" in path)

    with pytest.raises(StorageError, match=f"s3://{bucket}/runs.*InternalError"):
        storage.upload_file(source, "step-1/model.safetensors")

    assert not storage.exists("step-1/model.safetensors")
    # The transfer manager aborted the multipart upload: no parts left behind.
    assert not moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_missing_credentials_fail_clearly(
    bucket: str, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = open_storage(f"s3://{bucket}/runs", endpoint_url=moto_server.endpoint, s3_options=FAST)

    with pytest.raises(CredentialsError, match=f"no S3 credentials for s3://{bucket}/runs.*AWS_ACCESS_KEY_ID"):
        storage.check_access()


@pytest.mark.parametrize(
    ("key_id", "secret", "code"),
    [("admin", "wrong-secret", "SignatureDoesNotMatch"), ("AKIAUNKNOWNKEY000000", "whatever", "InvalidAccessKeyId")],
)
def test_wrong_credentials_fail_clearly(
    bucket: str, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, key_id: str, secret: str, code: str
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.admin.access_key_id if key_id == "admin" else key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = open_storage(f"s3://{bucket}/runs", endpoint_url=moto_server.endpoint, s3_options=FAST)

    with pytest.raises(CredentialsError, match=f"rejected the credentials for s3://{bucket}/runs \\({code}"):
        storage.check_access()


def test_read_only_credentials_cannot_hold_checkpoints(
    bucket: str, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.reader.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.reader.secret_access_key)
    storage = open_storage(f"s3://{bucket}/runs", endpoint_url=moto_server.endpoint, s3_options=FAST)

    storage.check_access(write=False)  # enough to resume from
    with pytest.raises(CredentialsError, match="access denied .*AccessDenied on PutObject"):
        storage.check_access()


def test_a_missing_bucket_fails_clearly(s3_env: MotoServer) -> None:
    storage = open_storage("s3://no-such-bucket/runs", endpoint_url=s3_env.endpoint, s3_options=FAST)

    with pytest.raises(NotFoundError, match=f"bucket 'no-such-bucket' does not exist at {s3_env.endpoint}"):
        storage.check_access()


def test_an_unreachable_endpoint_fails_fast(s3_env: MotoServer) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    storage = open_storage("s3://checkpoints/runs", endpoint_url=endpoint, s3_options=FAST)

    started = time.monotonic()
    with pytest.raises(UnreachableError, match=f"cannot reach the S3 endpoint {endpoint} for s3://checkpoints/runs"):
        storage.check_access()
    assert time.monotonic() - started < 5


# -------------------------------------------------------------------------------- open_storage


def test_open_storage_picks_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_env: MotoServer) -> None:
    monkeypatch.chdir(tmp_path)
    local = open_storage("file://./runs")
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "runs"
    assert local.uri_for("step-1/a") == f"file://{tmp_path}/runs/step-1/a"

    s3 = open_storage("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri_for("step-1") == "s3://bucket/some/prefix/step-1"
    assert open_storage("s3://bucket").uri_for("a") == "s3://bucket/a"

    with pytest.raises(ValueError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")
    with pytest.raises(ValueError, match="endpoint_url applies only to s3://"):
        open_storage("file:///tmp/x", endpoint_url="http://minio:9000")


def test_importing_storage_pulls_in_neither_torch_nor_boto3() -> None:
    code = "import sys, grpo_trainer.storage; print(sorted({'torch', 'boto3'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------ moving in, and full disks


def files_of(folder: Path) -> dict[str, tuple[int, str]]:
    """relative path → (size, sha256) of every file below ``folder``."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, sha256_of(p)) for p in folder.rglob("*") if p.is_file()}


def test_move_dir_hands_the_folder_over_with_the_same_digests(storage: Storage, tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "staged")
    expected = files_of(source)
    inodes = {rel: (source / rel).stat().st_ino for rel in expected}
    moved = storage.move_dir(source, "step-1")
    assert {f.key: (f.size, f.sha256) for f in moved} == {f"step-1/{rel}": entry for rel, entry in expected.items()}
    assert not source.exists()  # no staging copy left
    storage.download_dir("step-1", tmp_path / "back")
    assert files_of(tmp_path / "back") == expected
    if isinstance(storage, LocalStorage):  # renamed, not copied: the very same files
        assert {rel: (storage.root / "step-1" / rel).stat().st_ino for rel in expected} == inodes
        assert not list(storage.root.rglob(f"{PARTIAL_PREFIX}*"))


def test_move_dir_copies_what_cannot_be_renamed_across_filesystems(tmp_path: Path, monkeypatch) -> None:
    storage = LocalStorage(tmp_path / "store")
    source = make_checkpoint(tmp_path / "staged")
    expected = files_of(source)
    rename = os.replace

    def across_filesystems(src, dst):  # what rename(2) says from another mount; the store's own temp files still rename
        if not Path(src).is_relative_to(storage.root):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), str(dst))
        rename(src, dst)

    monkeypatch.setattr(grpo_trainer.storage.os, "replace", across_filesystems)
    moved = storage.move_dir(source, "step-1")
    assert {f.key: (f.size, f.sha256) for f in moved} == {f"step-1/{rel}": entry for rel, entry in expected.items()}
    assert not source.exists() and files_of(storage.root / "step-1") == expected


def test_a_full_store_says_which_filesystem_and_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    storage = LocalStorage(tmp_path / "store")
    source = make_checkpoint(tmp_path / "staged")

    def fills_up(src, dst):  # writes part of the file, then the disk is full
        dst.write(src.read(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(grpo_trainer.storage, "_copy_hashing", fills_up)
    with pytest.raises(StorageFullError) as raised:
        storage.upload_dir(source, "step-1")
    message = str(raised.value)
    assert "\n" not in message and f"to {storage.uri}/step-1/" in message
    assert "no space left on the filesystem at /" in message and " free)" in message
    assert not storage.list_objects() and not list(storage.root.rglob(f"{PARTIAL_PREFIX}*"))


def test_a_real_full_filesystem_fails_a_move_cleanly(tmp_path: Path, small_filesystem) -> None:
    """A 2 MB tmpfs store and a 3 MB file staged on another filesystem: rename(2) says EXDEV, the
    copy meets a real ENOSPC, and nothing is left on the small filesystem."""
    storage = LocalStorage(small_filesystem("store", 2))
    source = make_checkpoint(tmp_path / "staged", big=3 * MiB)
    with pytest.raises(StorageFullError, match=rf"no space left on the filesystem at {storage.root} \(.* free\)"):
        storage.move_dir(source, "step-1")
    assert not [p for p in storage.root.rglob("*") if p.is_file() and p.name.startswith(PARTIAL_PREFIX)]
    assert not (storage.root / "step-1" / "model.safetensors").exists()


def test_an_s3_download_onto_a_full_filesystem_says_which(bucket: str, moto_server: MotoServer, tmp_path: Path,
                                                         small_filesystem) -> None:
    storage = open_storage(f"s3://{bucket}/runs/demo", endpoint_url=moto_server.endpoint, s3_options=FAST)
    storage.upload_dir(make_checkpoint(tmp_path / "source", big=3 * MiB), "step-1")
    local = small_filesystem("local", 2)
    with pytest.raises(StorageFullError, match=rf"download {storage.uri}/step-1/.*no space left on the filesystem at {local} "):
        storage.download_dir("step-1", local / "resume")
    assert not [p for p in local.rglob("*") if p.is_file()]  # no partial download left
