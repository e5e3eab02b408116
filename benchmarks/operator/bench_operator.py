"""Reconcile latency, API calls per run and memory of the operator, against the API emulator.

The emulator (tests/kube_emulator.py) serves in this process; the operator runs as deployed, as
``grpo operator`` in a child process with its default settings, logged in with a kubeconfig that
points at the emulator. For each number of runs, a fresh cluster and operator:

- 1 run: --singles runs applied one after the other, each once the previous one has its pod, after
  one unmeasured run that pays for the imports and the first validation;
- N runs: N runs applied at once, as ``kubectl apply -f`` of a directory would.

Latency is apply → the run's pod exists in the emulator (polled every 5 ms). API calls are every
call made from the first apply until the runs are settled (pod, status and events written) and a
second has passed with no call, divided by the number of runs. Memory is the operator process's
RSS (Linux /proc): after start-up, and its peak.

    .venv/bin/python benchmarks/operator/bench_operator.py [--runs 1 50 200] [--singles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.metadata
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the emulator is a test fixture module

from kube_emulator import EVENTS, GRPORUNS, PODS, KubeEmulator, api_call, emulated_cluster  # noqa: E402

from grpo_operator.cluster import USER_AGENT  # noqa: E402
from grpo_operator.manifests import pod_name  # noqa: E402

NAMESPACE = "default"
EXAMPLE = yaml.safe_load((REPO / "examples" / "cpu-smollm2.yaml").read_text())
POLL_SECONDS = 0.005
QUIET_SECONDS = 1.0


def manifest(name: str) -> dict[str, Any]:
    return {**EXAMPLE, "metadata": {"name": name}}


@dataclass
class Result:
    at_once: int
    runs: int
    latencies: list[float]
    calls: collections.Counter[str]
    operator_calls: int
    rss_idle_mib: float
    rss_peak_mib: float
    cpu_seconds: float

    def row(self) -> str:
        ms = sorted(1000 * seconds for seconds in self.latencies)
        p50, p95 = statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        per_run = sum(self.calls.values()) / self.runs
        top = ", ".join(f"{call} {count / self.runs:.1f}" for call, count in self.calls.most_common(4))
        how = "all at once" if self.at_once > 1 else f"one at a time, {self.runs} in all"
        return (
            f"| {self.at_once} | {how} | {p50:.0f} | {p95:.0f} | {max(ms):.0f} | {per_run:.1f} "
            f"| {self.operator_calls / self.runs:.1f} | {top} | {self.rss_idle_mib:.0f} → {self.rss_peak_mib:.0f} "
            f"| {self.cpu_seconds / self.runs * 1000:.0f} |"
        )


def process_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) in KiB from /proc/<pid>/status; utime+stime ticks from /proc/<pid>/stat."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "rss": int(fields["VmRSS"].split()[0]),
        "peak": int(fields["VmHWM"].split()[0]),
        "cpu_ticks": int(stat[11]) + int(stat[12]),
    }


def kubeconfig(kube: KubeEmulator, directory: Path) -> Path:
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(kube.url).rstrip("/")}}],
        "users": [{"name": "bench", "user": {"token": "any"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "bench"}}],
    }))
    return path


async def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout} s")
        await asyncio.sleep(POLL_SECONDS)


def existing(kube: KubeEmulator, resource: Any) -> set[str]:
    return {name for (kind, _, name), obj in kube.objects.items() if kind == resource and not obj.deleted}


def settled(kube: KubeEmulator, names: list[str]) -> bool:
    """Every run has its pod, a status saying so, and its event."""
    runs = {name: kube.objects[GRPORUNS, NAMESPACE, name] for name in names}
    created = all(
        any(c["type"] == "Created" and c["status"] == "True" for c in (run.get("status") or {}).get("conditions", []))
        for run in runs.values()
    )
    told = {obj["involvedObject"]["name"] for (kind, _, _), obj in kube.objects.items() if kind == EVENTS and not obj.deleted}
    return created and told >= set(names)


async def quiet(kube: KubeEmulator) -> None:
    """Until a second passes with no API call."""
    while True:
        before = len(list(kube))
        await asyncio.sleep(QUIET_SECONDS)
        if len(list(kube)) == before:
            return


async def measure(runs: int, singles: int) -> Result:
    async with emulated_cluster() as kube:
        with tempfile.TemporaryDirectory() as directory:
            environment = {**os.environ, "KUBECONFIG": str(kubeconfig(kube, Path(directory)))}
            operator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "grpo_trainer.cli", "operator", "--namespace", NAMESPACE,
                env=environment, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                return await apply_runs(kube, operator.pid, runs, singles)
            finally:
                operator.send_signal(signal.SIGINT)
                await operator.wait()


async def apply_runs(kube: KubeEmulator, pid: int, runs: int, singles: int) -> Result:
    await until(lambda: any(r.resource == PODS and "watch" in r.params for r in kube), timeout=60)  # kopf is up
    if runs == 1:  # one unmeasured run: imports, CEL compilation, the client's first calls
        kube.create_object(GRPORUNS, manifest("warm-up"), NAMESPACE)
        await until(lambda: settled(kube, ["warm-up"]), timeout=60)
        await quiet(kube)
    idle = process_status(pid)
    first_call = len(list(kube))

    names, latencies = [], []
    batches = [[f"run-{index}"] for index in range(singles)] if runs == 1 else [[f"run-{index}" for index in range(runs)]]
    for batch in batches:
        waiting = {}  # name → when it was applied
        for name in batch:
            kube.create_object(GRPORUNS, manifest(name), NAMESPACE)
            waiting[name] = time.monotonic()
        while waiting:
            pods = existing(kube, PODS)
            now = time.monotonic()
            for name in [name for name in waiting if pod_name(name, 1) in pods]:
                latencies.append(now - waiting.pop(name))
            await asyncio.sleep(POLL_SECONDS)
        names += batch
        await until(lambda: settled(kube, names), timeout=300)
    await quiet(kube)

    done = process_status(pid)
    requests = list(kube)[first_call:]
    calls = collections.Counter(f"{call.verb} {call.resource}" for request in requests if (call := api_call(request)))
    ours = sum(1 for request in requests if request.headers.get("User-Agent") == USER_AGENT)
    return Result(
        at_once=runs,
        runs=len(names),
        latencies=latencies,
        calls=calls,
        operator_calls=ours,
        rss_idle_mib=idle["rss"] / 1024,
        rss_peak_mib=done["peak"] / 1024,
        cpu_seconds=(done["cpu_ticks"] - idle["cpu_ticks"]) / os.sysconf("SC_CLK_TCK"),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--singles", type=int, default=20, help="how many runs the 1-run case applies, one at a time")
    args = parser.parse_args()

    load = os.getloadavg()
    results = [await measure(runs, args.singles) for runs in args.runs]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
          f"kopf {importlib.metadata.version('kopf')}; "
          f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print()
    print("| runs at once | applied | p50 ms | p95 ms | max ms | API calls / run | of them the reconcile's | most calls / run | operator RSS MiB idle → peak | operator CPU ms / run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    asyncio.run(main())
