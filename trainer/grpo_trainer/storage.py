"""Where checkpoints live: one interface over s3:// and file:// storage.

A :class:`Storage` is rooted at a URI (``s3://bucket/prefix`` or ``file://path``) and addressed by
keys relative to that root, '/'-separated (``step-000050/model.safetensors``). A prefix names a
folder: ``step-1`` never matches ``step-10/...``. Every transfer reports the sha256 of the bytes
it moved, and downloads can verify one, so the checkpoint manifest built on top of this layer can
prove a checkpoint complete and intact.

Nothing under a final name is ever half written: file:// writes a temporary file and renames it;
S3 only shows an object once its upload completes (an interrupted multipart upload shows nothing).
:meth:`Storage.move_dir` hands a local folder over to the store: file:// renames each file into
place when the folder is on the store's filesystem, so a checkpoint is written to disk once.

Errors are :class:`StorageError` subclasses whose messages name the URI and say what is wrong; the
botocore exception is kept as ``__cause__`` for debugging. boto3 is imported only by S3Storage, so
file:// storage works without it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from grpo_trainer.disk_space import describe

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

MiB = 1024 * 1024

PARTIAL_PREFIX = ".partial-"
"""Name prefix of the temporary files that become a local file once written; listings skip them."""

ACCESS_PROBE_KEY = ".grpo-access-check"
"""Key that check_access(write=True) writes and deletes to prove the store is writable."""

_COPY_CHUNK = 4 * MiB


# ------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed; the message names the URI and the cause."""


class CredentialsError(StorageError):
    """Credentials are missing, rejected, or lack a permission the operation needs."""


class NotFoundError(StorageError):
    """The bucket, key or local directory does not exist."""


class IntegrityError(StorageError):
    """A downloaded file's sha256 differs from the expected one: the stored object is corrupt."""


class UnreachableError(StorageError):
    """The storage endpoint could not be reached or kept timing out, even after retries."""


class StorageFullError(StorageError):
    """A filesystem being written to has no space left (or too little for what is to be written);
    the message names it and what it has free."""


# -------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object: its key relative to the storage root and its size in bytes."""

    key: str
    size: int


@dataclass(frozen=True)
class TransferredFile(ObjectInfo):
    """A file that was uploaded or downloaded: the sha256 is of the bytes actually moved."""

    sha256: str
    path: Path


@dataclass(frozen=True)
class S3Options:
    """Network and transfer settings of S3Storage. The defaults suit ~500 MB checkpoints (see
    benchmarks/README.md, "Checkpoint storage")."""

    max_attempts: int = 10
    """Tries per request (botocore "standard" retries: exponential backoff with jitter, capped at
    20 s); 10 rides out about a minute of 5xx, throttling or timeouts."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_chunksize: int = 16 * MiB
    """Part size, and the size from which a file goes multipart: a 480 MB file is 29 parts, and a
    failed part costs 16 MiB to resend."""
    max_concurrency: int = 8
    """Parts (of one file or several) in flight at once; memory is about chunksize x 10."""
    check_attempts: int = 2
    """Tries per request in check_access, which should fail fast rather than ride out an outage."""


# ------------------------------------------------------------------------------ the interface


class Storage(ABC):
    """Checkpoint storage rooted at ``uri``; keys are relative to it and '/'-separated."""

    uri: str

    def uri_for(self, key: str) -> str:
        """The URI of ``key`` (a key or prefix; "" is the root itself)."""
        return f"{self.uri}/{key}" if key else self.uri

    @abstractmethod
    def check_access(self, *, write: bool = True) -> None:
        """Fail fast, before any training, unless the root can be listed (and written and deleted
        from, if ``write``). Raises CredentialsError, NotFoundError or UnreachableError."""

    @abstractmethod
    def upload_files(self, files: Mapping[str, Path]) -> list[TransferredFile]:
        """Upload local files to keys ({key: local path}), overwriting; in the order given."""

    @abstractmethod
    def download_files(
        self, files: Mapping[str, Path], *, sha256: Mapping[str, str] | None = None
    ) -> list[TransferredFile]:
        """Download keys to local paths ({key: local path}); a key in ``sha256`` must match its
        digest or IntegrityError is raised and nothing is left at that path."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object (a manifest), replacing any object at ``key``."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a small object; NotFoundError if there is none."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under the folder ``prefix`` ("" for all), sorted by key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object at ``key``, if any."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix`` and return how many there were. An empty
        prefix is refused: a run's checkpoints are never wiped wholesale by accident."""

    def move_dir(self, local_dir: Path, prefix: str) -> list[TransferredFile]:
        """Like upload_dir, and ``local_dir`` is gone afterwards. Here: upload, then delete."""
        uploaded = self.upload_dir(local_dir, prefix)
        shutil.rmtree(local_dir)
        return uploaded

    def upload_file(self, path: Path, key: str) -> TransferredFile:
        """Upload one local file to ``key``."""
        return self.upload_files({key: Path(path)})[0]

    def upload_dir(self, local_dir: Path, prefix: str) -> list[TransferredFile]:
        """Upload every file below ``local_dir`` to the same relative keys under ``prefix``."""
        _check_prefix(prefix)
        return self.upload_files({_join(prefix, rel): path for rel, path in _files_below(Path(local_dir))})

    def download_file(self, key: str, path: Path, *, sha256: str | None = None) -> TransferredFile:
        """Download ``key`` to ``path``, verifying ``sha256`` if given."""
        return self.download_files({key: Path(path)}, sha256={key: sha256} if sha256 else None)[0]

    def download_dir(
        self, prefix: str, local_dir: Path, *, sha256: Mapping[str, str] | None = None
    ) -> list[TransferredFile]:
        """Download every object under ``prefix`` into ``local_dir`` (same relative paths).
        ``sha256`` maps relative paths to expected digests: each must exist and match."""
        _check_prefix(prefix)
        relative = {obj.key.removeprefix(f"{prefix}/") if prefix else obj.key for obj in self.list_objects(prefix)}
        relative |= set(sha256 or {})
        return self.download_files(
            {_join(prefix, rel): Path(local_dir, *rel.split("/")) for rel in sorted(relative)},
            sha256={_join(prefix, rel): digest for rel, digest in (sha256 or {}).items()},
        )


def open_storage(uri: str, *, endpoint_url: str | None = None, s3_options: S3Options | None = None) -> Storage:
    """The storage for ``s3://bucket[/prefix]`` or ``file://path`` (the spec's checkpoints.storage);
    ``endpoint_url`` points s3:// at an S3-compatible store such as MinIO or Ceph."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"storage URI {uri!r} names no bucket: expected s3://bucket/prefix")
        return S3Storage(bucket, prefix.strip("/"), endpoint_url=endpoint_url, options=s3_options or S3Options())
    if uri.startswith("file://"):
        if endpoint_url is not None:
            raise ValueError(f"endpoint_url applies only to s3:// storage, not {uri!r}")
        path = uri.removeprefix("file://")
        if not path:
            raise ValueError(f"storage URI {uri!r} names no path: expected file://path")
        return LocalStorage(Path(path))
    raise ValueError(f"unsupported storage URI {uri!r}: expected s3://bucket/prefix or file://path")


# ---------------------------------------------------------------------------------- file://


class LocalStorage(Storage):
    """file:// storage: a directory tree. Writes go to a temporary file beside the target that is
    synced and renamed over it, and move_dir renames whole files that are synced first, so a killed
    writer leaves no half file under a final name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = f"file://{self.root}"

    def check_access(self, *, write: bool = True) -> None:
        if not write:
            if not self.root.is_dir():
                raise NotFoundError(f"{self.uri} is not a directory")
            return
        self.put_bytes(ACCESS_PROBE_KEY, b"")
        self.delete(ACCESS_PROBE_KEY)

    def upload_files(self, files: Mapping[str, Path]) -> list[TransferredFile]:
        done = []
        for key, source in files.items():
            with _os_errors(f"upload {source} to {self.uri_for(key)}", filling=self.root):
                with open(source, "rb") as src, _replacing(self._path(key)) as temp, open(temp, "wb") as dst:
                    size, digest = _copy_hashing(src, dst)
            done.append(TransferredFile(key, size, digest, Path(source)))
        return done

    def move_dir(self, local_dir: Path, prefix: str) -> list[TransferredFile]:
        """Rename each file into place (one read, to hash it, and no second copy on disk); a file
        on another filesystem (EXDEV) is copied and then deleted instead."""
        _check_prefix(prefix)
        moved = []
        for rel, source in _files_below(Path(local_dir)):
            key = _join(prefix, rel)
            with _os_errors(f"move {source} to {self.uri_for(key)}", filling=self.root):
                moved.append(self._move(source, key))
        shutil.rmtree(local_dir)  # only its folders are left
        return moved

    def _move(self, source: Path, key: str) -> TransferredFile:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as staged:
            # On disk before its final name shows it, as a copy would be (see _sync).
            os.fsync(staged.fileno())
        try:
            os.replace(source, target)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            copied = self.upload_files({key: source})[0]
            source.unlink()
            return copied
        with open(target, "rb") as moved:  # just written, so read from the page cache
            digest = hashlib.file_digest(moved, "sha256").hexdigest()
        return TransferredFile(key, target.stat().st_size, digest, source)

    def download_files(
        self, files: Mapping[str, Path], *, sha256: Mapping[str, str] | None = None
    ) -> list[TransferredFile]:
        done = []
        for key, target in files.items():
            with _os_errors(f"download {self.uri_for(key)} to {target}", filling=Path(target)):
                with open(self._path(key), "rb") as src, _replacing(Path(target)) as temp, open(temp, "wb") as dst:
                    size, digest = _copy_hashing(src, dst)
                    _verify(self.uri_for(key), digest, (sha256 or {}).get(key))
            done.append(TransferredFile(key, size, digest, Path(target)))
        return done

    def verify(self, key: str, sha256: str) -> None:
        """Raise IntegrityError unless the file at ``key`` has this digest: read where it is, not copied."""
        with _os_errors(f"read {self.uri_for(key)}"), open(self._path(key), "rb") as stored:
            _verify(self.uri_for(key), hashlib.file_digest(stored, "sha256").hexdigest(), sha256)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _os_errors(f"write {self.uri_for(key)}", filling=self.root):
            with _replacing(self._path(key)) as temp, open(temp, "wb") as dst:
                dst.write(data)
                _sync(dst)

    def get_bytes(self, key: str) -> bytes:
        with _os_errors(f"read {self.uri_for(key)}"):
            return self._path(key).read_bytes()

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        found = []
        with _os_errors(f"list {self.uri_for(prefix)}"):
            for directory, _, names in os.walk(self._folder(prefix)):
                for name in names:
                    if not name.startswith(PARTIAL_PREFIX):
                        path = Path(directory, name)
                        found.append(ObjectInfo(path.relative_to(self.root).as_posix(), path.stat().st_size))
        return sorted(found, key=lambda obj: obj.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with _os_errors(f"delete {self.uri_for(key)}"):
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        _refuse_root(prefix, self.uri)
        count = len(self.list_objects(prefix))
        with _os_errors(f"delete {self.uri_for(prefix)}"):
            if self._folder(prefix).is_dir():
                shutil.rmtree(self._folder(prefix))
        return count

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root.joinpath(*key.split("/"))

    def _folder(self, prefix: str) -> Path:
        _check_prefix(prefix)
        return self.root.joinpath(*prefix.split("/")) if prefix else self.root


@contextmanager
def _os_errors(action: str, *, filling: Path | None = None) -> Iterator[None]:
    """Turn OSErrors from local files into StorageErrors that say what was being done; running out
    of space on ``filling``'s filesystem (where the action writes) is a StorageFullError naming it."""
    try:
        with _space_errors(action, filling):
            yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        raise NotFoundError(f"cannot {action}: {err.filename} does not exist") from err
    except OSError as err:
        raise StorageError(f"cannot {action}: {err.strerror or err} ({err.filename})") from err


@contextmanager
def _space_errors(action: str, filling: Path | None) -> Iterator[None]:
    """Running out of space (ENOSPC, or a quota's EDQUOT) on ``filling``'s filesystem: a
    StorageFullError naming it. Other errors pass as they are."""
    try:
        yield
    except OSError as err:
        if filling is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(f"cannot {action}: no space left on {describe(filling)}") from err
        raise


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it if the block succeeds and is removed if
    it fails (the same directory, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL_PREFIX)
    os.close(fd)
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    """Copy src to dst, synced to disk, and return the size and sha256 of what was copied."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(_COPY_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    _sync(dst)
    return size, digest.hexdigest()


def _sync(file: BinaryIO) -> None:
    # On disk before the rename makes it visible: after a node crash a name may be missing, but
    # it never holds a half-written file.
    file.flush()
    os.fsync(file.fileno())


# ------------------------------------------------------------------------------------- s3://


class _HashingReader:
    """A file, readable once and not seekable, that hashes what is read from it.

    s3transfer reads a non-seekable source exactly once and in order, buffering each part in
    memory for retries, so the digest is that of the bytes uploaded: one pass over the file."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, amount: int = -1) -> bytes:
        data = self._file.read(amount)
        self.sha256.update(data)
        self.size += len(data)
        return data


# S3 error codes, by what they mean for the user.
_REJECTED_CREDENTIALS = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"
}
_DENIED = {"AccessDenied", "AllAccessDisabled", "403"}
_MISSING = {"NoSuchKey", "NotFound", "404"}


class S3Storage(Storage):
    """s3:// storage on AWS S3 or an S3-compatible store (``endpoint_url``). Credentials come from
    boto3's default chain: in the trainer pod, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the
    run's credentials secret."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, options: S3Options = S3Options()
    ) -> None:
        import boto3

        _check_prefix(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.options = options
        with self._errors(self.uri):
            self._session = boto3.Session()
            self._client = self._make_client(options.max_attempts)

    def _make_client(self, max_attempts: int) -> Any:
        from botocore.config import Config

        config = Config(
            # total_max_attempts counts the first try; botocore's "max_attempts" would not.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
            max_pool_connections=self.options.max_concurrency + 2,  # transfer threads, and a call beside them
        )
        if self.endpoint_url is not None:
            # MinIO and Ceph serve path-style URLs whatever the DNS setup, and many reject the
            # x-amz-checksum headers botocore >= 1.36 sends by default; our sha256 covers integrity.
            config = config.merge(
                Config(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
            )
        return self._session.client("s3", endpoint_url=self.endpoint_url, config=config)

    @property
    def _endpoint(self) -> str:
        return self.endpoint_url or "AWS S3"

    def _transfer_config(self) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.options.multipart_chunksize,
            multipart_chunksize=self.options.multipart_chunksize,
            max_concurrency=self.options.max_concurrency,
            # Not the CRT manager boto3 picks on some GPU instance types when awscrt is installed:
            # max_concurrency and the one-pass hashing of _HashingReader hold for the classic one.
            preferred_transfer_client="classic",
        )

    def check_access(self, *, write: bool = True) -> None:
        probe = self._key(ACCESS_PROBE_KEY)
        with self._errors(self.uri):
            if self._session.get_credentials() is None:
                raise CredentialsError(
                    f"no S3 credentials for {self.uri} at {self._endpoint}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (the run's checkpoints.credentialsSecret)"
                )
            client = self._make_client(self.options.check_attempts)
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._folder(""), MaxKeys=1)
            if write:
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
                client.delete_object(Bucket=self.bucket, Key=probe)

    def upload_files(self, files: Mapping[str, Path]) -> list[TransferredFile]:
        from boto3.s3.transfer import create_transfer_manager

        s3_keys = {key: self._key(key) for key in files}
        with self._errors(self.uri), ExitStack() as stack:
            with _os_errors(f"upload to {self.uri}"):
                readers = {key: _HashingReader(stack.enter_context(open(path, "rb"))) for key, path in files.items()}
            # Leaving the manager on an error cancels the other transfers and aborts their
            # multipart uploads, so a failed upload leaves no object behind.
            with create_transfer_manager(self._client, self._transfer_config()) as manager:
                futures = {key: manager.upload(reader, self.bucket, s3_keys[key]) for key, reader in readers.items()}
                for key, future in futures.items():
                    with self._errors(self.uri_for(key)):
                        future.result()
        return [
            TransferredFile(key, reader.size, reader.sha256.hexdigest(), Path(files[key]))
            for key, reader in readers.items()
        ]

    def download_files(
        self, files: Mapping[str, Path], *, sha256: Mapping[str, str] | None = None
    ) -> list[TransferredFile]:
        from boto3.s3.transfer import create_transfer_manager

        s3_keys = {key: self._key(key) for key in files}
        done = []
        with ExitStack() as stack:
            temps = {key: stack.enter_context(_replacing(Path(target))) for key, target in files.items()}
            with self._errors(self.uri), create_transfer_manager(self._client, self._transfer_config()) as manager:
                futures = {key: manager.download(self.bucket, s3_keys[key], str(temp)) for key, temp in temps.items()}
                for key, future in futures.items():
                    with self._errors(self.uri_for(key)), _space_errors(f"download {self.uri_for(key)}", Path(files[key])):
                        future.result()
            for key, temp in temps.items():
                with open(temp, "rb") as downloaded:
                    digest = hashlib.file_digest(downloaded, "sha256").hexdigest()
                _verify(self.uri_for(key), digest, (sha256 or {}).get(key))
                done.append(TransferredFile(key, temp.stat().st_size, digest, Path(files[key])))
        return done

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(self.uri_for(key)):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with self._errors(self.uri_for(key)):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        root = self._folder("")
        found = []
        with self._errors(self.uri_for(prefix)):
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._folder(prefix)
            ):
                found += [
                    ObjectInfo(obj["Key"].removeprefix(root), obj["Size"])
                    for obj in page.get("Contents", [])
                    # Keys ending in '/' are the empty "folder" markers some consoles create.
                    if not obj["Key"].endswith("/")
                ]
        return sorted(found, key=lambda obj: obj.key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(self.uri_for(key)):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if err.response["Error"].get("Code") in _MISSING:
                    return False
                raise
        return True

    def delete(self, key: str) -> None:
        with self._errors(self.uri_for(key)):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``, and abort the multipart uploads still pending
        there: a writer killed mid-upload leaves parts that are invisible but billed."""
        _refuse_root(prefix, self.uri)
        folder = self._folder(prefix)
        keys = [self._key(obj.key) for obj in self.list_objects(prefix)]
        with self._errors(self.uri_for(prefix)):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise StorageError(
                        f"could not delete {len(errors)} objects under {self.uri_for(prefix)}, e.g. "
                        f"{first['Key']}: {first.get('Code')}: {first.get('Message')}"
                    )
            for page in self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=folder
            ):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
        return len(keys)

    def _key(self, key: str) -> str:
        _check_key(key)
        return _join(self.prefix, key)

    def _folder(self, prefix: str) -> str:
        """The S3 key prefix of a folder: '' for the bucket's root, else ending in '/'."""
        _check_prefix(prefix)
        full = _join(self.prefix, prefix)
        return f"{full}/" if full else ""

    @contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Turn botocore and s3transfer exceptions into StorageErrors that name ``uri``."""
        from botocore import exceptions as boto
        from s3transfer.exceptions import RetriesExceededError

        try:
            yield
        except boto.ClientError as err:
            raise self._client_error(err, uri) from err
        except (boto.NoCredentialsError, boto.PartialCredentialsError, boto.CredentialRetrievalError) as err:
            raise CredentialsError(
                f"no usable S3 credentials for {uri} at {self._endpoint} ({err}): set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (the run's checkpoints.credentialsSecret)"
            ) from err
        except (boto.ConnectionError, boto.HTTPClientError, RetriesExceededError) as err:
            cause = err.last_exception if isinstance(err, RetriesExceededError) else err
            raise UnreachableError(
                f"cannot reach the S3 endpoint {self._endpoint} for {uri}, even after retries: {cause}"
            ) from err
        except boto.BotoCoreError as err:
            raise StorageError(f"{uri}: {err}") from err

    def _client_error(self, err: ClientError, uri: str) -> StorageError:
        code = err.response.get("Error", {}).get("Code", "")
        message = err.response.get("Error", {}).get("Message", "")
        operation = err.operation_name
        if code in _REJECTED_CREDENTIALS:
            return CredentialsError(
                f"{self._endpoint} rejected the credentials for {uri} ({code} on {operation}): check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the run's checkpoints.credentialsSecret"
            )
        if code in _DENIED:
            return CredentialsError(
                f"access denied to {uri} at {self._endpoint} ({code} on {operation}): the credentials "
                "lack a permission the run needs (list, get, put and delete objects)"
            )
        if code == "NoSuchBucket":
            return NotFoundError(f"bucket {self.bucket!r} does not exist at {self._endpoint} (for {uri})")
        if code in _MISSING:
            return NotFoundError(f"{uri} does not exist")
        return StorageError(f"{operation} on {uri} at {self._endpoint} failed: {code}: {message}")


# ------------------------------------------------------------------------------ shared helpers


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key {key!r}: expected '/'-separated names, no '.', '..' or empty ones")


def _check_prefix(prefix: str) -> None:
    if prefix:
        _check_key(prefix)


def _refuse_root(prefix: str, uri: str) -> None:
    if not prefix:
        raise ValueError(f"refusing to delete everything under {uri}: name a prefix")


def _join(prefix: str, key: str) -> str:
    return "/".join(part for part in (prefix, key) if part)


def _files_below(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative key, path) of every file below ``local_dir``, sorted."""
    if not local_dir.is_dir():
        raise NotFoundError(f"{local_dir} is not a directory")
    return sorted((path.relative_to(local_dir).as_posix(), path) for path in local_dir.rglob("*") if path.is_file())


def _verify(uri: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected.lower():
        raise IntegrityError(
            f"{uri} is corrupt: its sha256 is {actual}, expected {expected.lower()} (refusing to use it)"
        )
