"""Upload and download throughput of a checkpoint-sized directory through the storage layer.

Starts moto's S3 server on a free localhost port (a child process), writes a checkpoint-like
directory (one large safetensors-sized file of random bytes and a few small json files), and
times upload_dir and download_dir for several transfer settings, each measured --repeats times:

- ours: S3Storage with the default S3Options;
- ours, boto3 sizes: S3Storage with boto3's default TransferConfig numbers (8 MiB parts, 10
  threads), to separate the settings from the code path;
- plain boto3: client.upload_file / download_file with boto3's default TransferConfig, file by
  file (no sha256), the baseline a hand-rolled uploader would get;
- file://: LocalStorage into a temporary directory, for reference.

    .venv/bin/python benchmarks/storage/bench_storage.py [--size-mb 480] [--repeats 2]

Peak disk use is about four times --size-mb (source, download, moto's parts and object); all of it
is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpo_trainer.storage import MiB, S3Options, S3Storage, Storage, open_storage

_SERVE = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""

SMALL_FILES = {
    "config.json": 1_000,
    "generation_config.json": 200,
    "tokenizer.json": 2_000_000,
    "trainer_state.json": 50_000,
}


@dataclass(frozen=True)
class Result:
    name: str
    upload_s: list[float]
    download_s: list[float]


def make_checkpoint(root: Path, size_mb: int) -> int:
    """Write the checkpoint directory and return its size in bytes."""
    root.mkdir(parents=True)
    with open(root / "model.safetensors", "wb") as weights:
        for _ in range(size_mb):
            weights.write(os.urandom(1_000_000))
    for name, size in SMALL_FILES.items():
        (root / name).write_bytes(os.urandom(size))
    return sum(path.stat().st_size for path in root.iterdir())


def time_storage(storage: Storage, source: Path, scratch: Path, repeats: int, name: str) -> Result:
    uploads, downloads = [], []
    for repeat in range(repeats):
        prefix = f"bench-{repeat}"
        started = time.perf_counter()
        storage.upload_dir(source, prefix)
        uploads.append(time.perf_counter() - started)
        target = scratch / prefix
        started = time.perf_counter()
        storage.download_dir(prefix, target)
        downloads.append(time.perf_counter() - started)
        shutil.rmtree(target)
        storage.delete_prefix(prefix)
    return Result(name, uploads, downloads)


def time_plain_boto3(endpoint: str, bucket: str, source: Path, scratch: Path, repeats: int) -> Result:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    files = sorted(path for path in source.iterdir() if path.is_file())
    uploads, downloads = [], []
    for repeat in range(repeats):
        prefix = f"plain-{repeat}"
        started = time.perf_counter()
        for path in files:
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        uploads.append(time.perf_counter() - started)
        target = scratch / prefix
        target.mkdir()
        started = time.perf_counter()
        for path in files:
            client.download_file(bucket, f"{prefix}/{path.name}", str(target / path.name))
        downloads.append(time.perf_counter() - started)
        shutil.rmtree(target)
        client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": f"{prefix}/{path.name}"} for path in files]}
        )
    return Result("plain boto3, default TransferConfig (no sha256)", uploads, downloads)


def rate(total_bytes: int, seconds: list[float]) -> str:
    return " / ".join(f"{total_bytes / s / 1e6:.0f}" for s in seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=480, help="size of model.safetensors in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tmp", type=Path, default=None, help="where temporary files go (default: the system's)")
    args = parser.parse_args()

    # Dummy credentials for moto; set here so no real ones from the environment are used.
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

    server = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=args.tmp) as temp:
            scratch = Path(temp)
            total = make_checkpoint(scratch / "checkpoint", args.size_mb)
            bucket = "bench"
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            boto3_sizes = S3Options(multipart_chunksize=8 * MiB, max_concurrency=10)
            runs: list[Callable[[], Result]] = [
                lambda: time_storage(S3Storage(bucket, "ours", endpoint_url=endpoint), scratch / "checkpoint",
                                     scratch, args.repeats, f"ours: {describe(S3Options())}"),
                lambda: time_storage(S3Storage(bucket, "boto3-sizes", endpoint_url=endpoint, options=boto3_sizes),
                                     scratch / "checkpoint", scratch, args.repeats,
                                     f"ours, boto3 sizes: {describe(boto3_sizes)}"),
                lambda: time_plain_boto3(endpoint, bucket, scratch / "checkpoint", scratch, args.repeats),
                lambda: time_storage(open_storage(f"file://{scratch / 'store'}"), scratch / "checkpoint", scratch,
                                     args.repeats, "file:// (LocalStorage, fsync)"),
            ]
            print(f"checkpoint: {total / 1e6:.0f} MB in {1 + len(SMALL_FILES)} files; MB/s per run (MB = 10^6 bytes)")
            print("| settings | upload MB/s | download MB/s | median up / down |")
            print("|---|---|---|---|")
            for run in runs:
                result = run()
                print(
                    f"| {result.name} | {rate(total, result.upload_s)} | {rate(total, result.download_s)} | "
                    f"{total / statistics.median(result.upload_s) / 1e6:.0f} / "
                    f"{total / statistics.median(result.download_s) / 1e6:.0f} |",
                    flush=True,
                )
    finally:
        server.stdin.close()
        server.terminate()
        server.wait(timeout=10)


def describe(options: S3Options) -> str:
    return f"{options.multipart_chunksize // MiB} MiB parts, {options.max_concurrency} threads"


if __name__ == "__main__":
    main()
