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

With --restart N, instead: N runs are resident in the cluster as an earlier operator left them
(each with its finalizer, ConfigMap, RBAC and pod, the status it last wrote), each with a spec of
its own; while that operator was down, a quarter of the pods started running and a quarter
finished. A new operator starts: catch-up is the time from its start until it has read every run's
pods and every status says what its pod does now, with no pod created or deleted; meanwhile a new
run is applied every 0.5 s, and its latency is apply → pod, as above. CPU is counted from the
operator's first call until it has caught up and at least 10 new runs have their pods: the
operator process's, and this process's (the emulator, and the polling that times the rest).

    .venv/bin/python benchmarks/operator/bench_operator.py [--runs 1 50 200] [--singles 20]
    .venv/bin/python benchmarks/operator/bench_operator.py --restart 1000
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the emulator is a test fixture module

from kube_emulator import (  # noqa: E402
    CONFIGMAPS,
    EVENTS,
    GRPORUNS,
    PODS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    ApiCall,
    KubeEmulator,
    api_call,
    emulated_cluster,
    terminated,
)

from grpo_operator import manifests  # noqa: E402
from grpo_operator.cluster import USER_AGENT  # noqa: E402
from grpo_operator.manifests import pod_name, run_labels  # noqa: E402
from grpo_operator.reconciliation import status_patch  # noqa: E402
from grpo_operator.state import ABSENT, decide, observe_pod  # noqa: E402
from grpo_trainer.spec import GRPORun, GRPORunStatus  # noqa: E402
from grpo_trainer.termination import Outcome, TerminationMessage  # noqa: E402

NAMESPACE = "default"
EXAMPLE = yaml.safe_load((REPO / "examples" / "cpu-smollm2.yaml").read_text())
POLL_SECONDS = 0.005
QUIET_SECONDS = 1.0
OPERATOR = [sys.executable, "-m", "grpo_trainer.cli", "operator", "--namespace", NAMESPACE]
NEW_RUN_SECONDS = 0.5
"""How often the restart scenario applies a new run while the operator catches up."""
MIN_NEW_RUNS = 10


def manifest(name: str, variant: int = 0) -> dict[str, Any]:
    """The example as run ``name``; each ``variant`` a spec of its own (its dataset.maxSamples),
    so that nothing the operator might cache by spec is shared between runs."""
    spec = {**EXAMPLE["spec"], "dataset": {**EXAMPLE["spec"]["dataset"], "maxSamples": 1000 + variant}}
    return {**EXAMPLE, "metadata": {"name": name}, "spec": spec}


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
                *OPERATOR, env=environment, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
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
        await until(lambda names=names: settled(kube, names), timeout=300)
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


# ------------------------------------------------------------------------------ restart


LIST_PODS = ApiCall("list", "pods")
RESIDENT_STATES = ("Pending", "Running", "Running", "Succeeded")
"""The pod of resident run i is in state i % 4 when the operator starts..."""
STATUS_STATES = ("Pending", "Running", "Pending", "Running")
"""...and its status says what the earlier operator saw: run 2 of 4 started, run 3 of 4 finished since."""


def reside(kube: KubeEmulator, index: int) -> tuple[str, str, str]:
    """Store run ``index`` as an earlier operator left it (see RESIDENT_STATES); returns its name,
    its pod's uid and the phase its status must come to."""
    name = f"resident-{index}"
    body = kube.create_object(GRPORUNS, manifest(name, variant=index), NAMESPACE)
    body = kube.patch_object(GRPORUNS, NAMESPACE, name, {"metadata": {"finalizers": ["grpo.dev/finalizer"]}})
    run = GRPORun.model_validate(body)  # the schema only: every variant passes the CEL rules as the example does
    for build in (manifests.config_map, manifests.service_account, manifests.role, manifests.role_binding):
        kube.create_object(BUILT[build], build(run), NAMESPACE)
    pod = kube.create_object(PODS, manifests.pod(run, attempt=1), NAMESPACE)
    status = GRPORunStatus()
    for state in ("Pending", STATUS_STATES[index % 4]):  # the passes the earlier operator made
        if state != "Pending":
            pod = kube.set_pod_status(NAMESPACE, pod["metadata"]["name"], state)
        observed = observe_pod(pod) if status.attempt else ABSENT
        decision = decide(run.spec, status, observed, generation=body["metadata"]["generation"], now=datetime.now(UTC))
        status = decision.status
    body = kube.patch_object(GRPORUNS, NAMESPACE, name, {"status": status_patch({}, status)}, "status")
    if RESIDENT_STATES[index % 4] == "Succeeded":  # the trainer says how it ended in its termination message
        said = TerminationMessage(Outcome.COMPLETED, step=EXAMPLE["spec"]["grpo"]["maxSteps"]).to_json()
        containers = {"trainer": terminated(0, message=said)}
        pod = kube.set_pod_status(NAMESPACE, pod["metadata"]["name"], "Succeeded", containers=containers)
    elif RESIDENT_STATES[index % 4] != STATUS_STATES[index % 4]:
        pod = kube.set_pod_status(NAMESPACE, pod["metadata"]["name"], RESIDENT_STATES[index % 4])
    return name, pod["metadata"]["uid"], RESIDENT_STATES[index % 4]


BUILT = {
    manifests.config_map: CONFIGMAPS,
    manifests.service_account: SERVICEACCOUNTS,
    manifests.role: ROLES,
    manifests.role_binding: ROLEBINDINGS,
}


@dataclass
class RestartResult:
    resident: int
    start_seconds: float
    catch_up_seconds: float
    latencies: list[float]
    cpu_seconds: float
    emulator_cpu_seconds: float
    operator_calls: collections.Counter[str]

    def row(self) -> str:
        ms = sorted(1000 * seconds for seconds in self.latencies)
        p50, p95 = statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        calls = sum(self.operator_calls.values()) / self.resident
        top = ", ".join(f"{call} {count / self.resident:.2f}" for call, count in self.operator_calls.most_common(4))
        return (
            f"| {self.resident} | {self.start_seconds:.1f} | {self.catch_up_seconds:.1f} | {len(ms)} | {p50:.0f} "
            f"| {p95:.0f} | {max(ms):.0f} | {self.cpu_seconds:.1f} | {self.emulator_cpu_seconds:.1f} | {calls:.2f}: {top} |"
        )


async def measure_restart(resident: int) -> RestartResult:
    async with emulated_cluster() as kube:
        runs = [reside(kube, index) for index in range(resident)]
        with tempfile.TemporaryDirectory() as directory:
            environment = {**os.environ, "KUBECONFIG": str(kubeconfig(kube, Path(directory)))}
            first_call = len(list(kube))
            started = time.monotonic()
            operator = await asyncio.create_subprocess_exec(
                *OPERATOR, env=environment, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            try:
                return await catch_up(kube, operator.pid, runs, started, first_call)
            finally:
                operator.send_signal(signal.SIGINT)
                await operator.wait()


async def catch_up(
    kube: KubeEmulator, pid: int, runs: list[tuple[str, str, str]], started: float, first_call: int
) -> RestartResult:
    """Apply a new run every NEW_RUN_SECONDS from kopf's first call until the operator has caught up
    with every resident run (and at least MIN_NEW_RUNS were applied); time both."""
    await until(lambda: len(list(kube)) > first_call, timeout=60)
    start_seconds = time.monotonic() - started
    cpu_before, emulator_cpu_before = process_status(pid)["cpu_ticks"], time.process_time()
    selectors = {",".join(f"{key}={value}" for key, value in run_labels(name).items()): name for name, _, _ in runs}
    listed: set[str] = set()  # the resident runs whose pods the operator has read
    seen = first_call
    pending = {name: phase for name, _, phase in runs}  # the resident runs not caught up yet
    caught_up_at = None
    waiting: dict[str, float] = {}  # new run → when it was applied
    latencies: list[float] = []
    next_apply = time.monotonic()
    while caught_up_at is None or waiting or len(latencies) < MIN_NEW_RUNS:
        now = time.monotonic()
        if now >= next_apply and (caught_up_at is None or len(latencies) + len(waiting) < MIN_NEW_RUNS):
            name = f"new-{len(latencies) + len(waiting)}"
            kube.create_object(GRPORUNS, manifest(name, variant=len(runs) + len(latencies) + len(waiting)), NAMESPACE)
            waiting[name] = time.monotonic()
            next_apply += NEW_RUN_SECONDS
        for name in [name for name in waiting if (PODS, NAMESPACE, pod_name(name, 1)) in kube.objects]:
            latencies.append(time.monotonic() - waiting.pop(name))
        if caught_up_at is None:
            requests = kube.requests_since(seen)
            seen += len(requests)
            for request in requests:
                call = api_call(request)
                if call == LIST_PODS and request.headers.get("User-Agent") == USER_AGENT:
                    listed.add(selectors.get(request.params.get("labelSelector", ""), ""))
            for name in [name for name in pending if name in listed]:
                status = kube.objects[GRPORUNS, NAMESPACE, name].raw.get("status") or {}
                if status.get("phase") == pending[name]:
                    del pending[name]
            if not pending:
                caught_up_at = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
    cpu = (process_status(pid)["cpu_ticks"] - cpu_before) / os.sysconf("SC_CLK_TCK")
    emulator_cpu = time.process_time() - emulator_cpu_before
    pods = [obj for (kind, _, _), obj in kube.objects.items() if kind == PODS and not obj.deleted]
    owned = collections.Counter(pod["metadata"]["labels"][manifests.RUN_LABEL] for pod in pods)
    for name, uid, _ in runs:  # the same pod, and no other
        pod = kube.read_object(PODS, NAMESPACE, pod_name(name, 1))
        assert pod is not None and pod["metadata"]["uid"] == uid and owned[name] == 1, f"the pods of {name} changed"
    requests = list(kube)[first_call:]
    calls = collections.Counter(
        f"{call.verb} {call.resource}" for request in requests
        if (call := api_call(request)) and request.headers.get("User-Agent") == USER_AGENT
    )
    return RestartResult(
        resident=len(runs),
        start_seconds=start_seconds,
        catch_up_seconds=caught_up_at - started,
        latencies=latencies,
        cpu_seconds=cpu,
        emulator_cpu_seconds=emulator_cpu,
        operator_calls=calls,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--singles", type=int, default=20, help="how many runs the 1-run case applies, one at a time")
    parser.add_argument("--restart", type=int, metavar="N", help="instead: restart the operator with N runs resident")
    args = parser.parse_args()

    load = os.getloadavg()
    if args.restart:
        restarted = await measure_restart(args.restart)
    else:
        results = [await measure(runs, args.singles) for runs in args.runs]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
          f"kopf {importlib.metadata.version('kopf')}; "
          f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print()
    if args.restart:
        print(
            "| resident runs | operator start-up s | catch-up s | new runs | new run p50 ms | p95 ms | max ms"
            " | operator CPU s | emulator CPU s | operator calls / resident run |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(restarted.row())
        return
    print(
        "| runs at once | applied | p50 ms | p95 ms | max ms | API calls / run | of them the reconcile's | most calls / run"
        " | operator RSS MiB idle → peak | operator CPU ms / run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    asyncio.run(main())
