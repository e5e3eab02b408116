"""The answer grader: math-verify in a pool of worker processes that a hang or crash cannot escape.

One grader serves the reward and the benchmark scores. What it compares is set by its profile:

- ``open-rs``, the training reward: the completion's final answer is extracted as Open-RS's accuracy
  reward did (boxed first; LaTeX only, well-formed operators required, nothing taken without an
  anchor such as ``\\boxed`` or "answer"; the first match decides). The gold is read by
  :func:`parse_gold`: a gold that marks its answer (a solution with ``\\boxed{}``, OlympiadBench's
  ``$…$``) with LaTeX extraction, a bare gold such as ``27`` or ``\\frac{14}{3}`` as
  ``\\boxed{27}``. (A plain-expression reader is not also run on solutions: it would take a stray
  number from one whose boxed answer sympy cannot read, 3 from Minerva's ``-1./3``.) A gold that
  still yields nothing is never rewarded against: the verdict is wrong with reason
  ``gold_unparsable``, where Open-RS's reward paid 1.0 to every completion.
- ``lighteval-expr`` and ``lighteval-latex``, the paper-comparable benchmark scores: exactly the
  verdicts of lighteval ed08481's ``multilingual_extractive_match_metric`` as Open-RS's
  ``evaluate.py`` configured it (predictions with ``ExprExtractionConfig()`` and
  ``LatexExtractionConfig(boxed_match_priority=0)``, any match, fallback "first_match",
  precision 5). The gold is read with ``ExprExtractionConfig`` (``-expr``: AIME, AMC, GSM8K) or
  ``LatexExtractionConfig`` (``-latex``: MATH-500, Minerva, OlympiadBench); see
  ``BENCHMARK_PROFILES``. Where that reading finds nothing, lighteval compared the raw gold string,
  and so do we: it equals only the string that "first_match" appends to a prediction (the first
  match's normalised text), after ``.strip()``; a parsed prediction never equals it. So an
  OlympiadBench gold written without ``$`` (409 of its 675), ``7,14,18``, is matched by
  ``\\boxed{7,14,18}`` but not by ``\\boxed{7, 14, 18}`` or ``\\boxed{\\{7,14,18\\}}``, and the gold
  ``11`` is not matched by ``$x = 11$``. Such a gold is graded, never ``gold_unparsable``.
  lighteval scored a problem 1 if any pair (part of the gold's extraction, part of the
  prediction's) compared equal, which is the product ``verify()`` takes, and took the best over a
  problem's completions; Open-RS sampled one per problem, so one verdict here is one problem's
  score. A comparison that raises or outlasts its alarm counts as unequal; a parse that does
  yields no value, and the next match is tried.
- ``lighteval-boxed-gold``, a second benchmark score beside the paper-comparable one: predictions
  as the lighteval profiles read them, golds as ``open-rs`` reads them (a bare gold as
  ``\\boxed{gold}``, so ``7,14,18`` is the set {7, 14, 18}; nothing left unparsed is ever
  string-compared). It grades the answer's value where the paper's metric graded the spelling of
  409 OlympiadBench answers; it is not comparable with the paper's numbers.

lighteval ed08481 carries its own copy of math-verify's extraction and comparison (synced
2025-02-05); where it differs from math-verify 0.5.2, the lighteval profiles follow lighteval:

- it orders extraction targets LaTeX before plain expressions whatever order they are given in,
  where math-verify keeps the given order; among matches of one priority that start and end at the
  same place the first target's wins (``answer = $ 2^3^2 $``: LaTeX's 64, Python's 512), so the
  predictions are extracted with LaTeX listed first;
- its ``LatexExtractionConfig`` matches ``\\boxed`` at priority 55 by default (math-verify: 50), after
  a "final answer … is" match rather than beside it: the LaTeX gold is read with that priority;
- its parses and comparisons have 5 s alarms (math-verify's defaults: 3 s); a comparison that
  outlasts its alarm is False in both.

Its comparison code (``compare_gold_target`` against ``verify``) is math-verify's, functions moved
about; ``verify`` is called as lighteval called ``compare_gold_target``, gold first. Two copy
differences are left out, as no verdict depends on them. When one completion joins several LaTeX
answers with "and" or commas, lighteval flattens any sympy ``FiniteSet`` among them into the tuple
of answers, math-verify only latex2sympy's own; latex2sympy 1.0.6 builds every set with its own
``FiniteSet`` (and leaves set operations unevaluated), so no parsed answer tells the two apart.
And math-verify's ``parse()`` turns an exception raised while extracting into no match, where
lighteval's would have stopped the whole evaluation: there is no verdict of lighteval's to follow.

math-verify bounds its sympy steps with SIGALRM, which only works in a main thread and does not
cover its regexes or LaTeX normalisation. So every parse and verify runs in a worker process (its
main thread, a memory cap, completion text only ever parsed, never evaluated), each item under a
wall-clock bound that the parent enforces by killing the worker and starting a new one.
concurrent.futures cannot kill one task, hence the small pool here built on multiprocessing's
processes, pipes and ``connection.wait``.

A GRPO step repeats itself: a group's completions give a few answers (the right one, some popular
wrong ones) against one gold. So each worker keeps the expensive, deterministic steps, keyed by
exactly what determines them: the sympy parse of a LaTeX (or plain) string, and verify()'s result
for the very parsed objects of an earlier item. A repeated answer then costs a regex pass and two
lookups, and the items of one gold go to one worker so that its caches see the repeats. A cache
never carries a failure from one item to another, and a miss runs as before, inside the item's
bound and the worker's memory cap.

What a cache misses is mostly latex2sympy's ANTLR parse of a new LaTeX string. Workers run it in
ANTLR's two stages, SLL prediction first and latex2sympy's own LL parse where SLL meets a syntax
error (:mod:`grpo_trainer.two_stage_parsing`): the same trees and errors, for a third of the CPU
once ANTLR's decision tables are filled.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from multiprocessing import connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any, Literal

log = logging.getLogger(__name__)

Profile = Literal["open-rs", "lighteval-expr", "lighteval-latex", "lighteval-boxed-gold"]
ProcessContext = ForkServerContext | SpawnContext  # what _process_context gives: never fork

BENCHMARK_PROFILES: dict[str, Profile] = {
    "aime24": "lighteval-expr",
    "amc23": "lighteval-expr",
    "math500": "lighteval-latex",
    "minerva": "lighteval-latex",
    "olympiadbench": "lighteval-latex",
    "gsm8k": "lighteval-expr",  # bare numbers, as AIME's and AMC's
}
"""The paper-comparable profile of each benchmark: the gold extraction Open-RS's evaluate.py gave its task."""

BENCHMARK_GOLD_COLUMNS = {
    "aime24": "answer",
    "math500": "solution",
    "amc23": "answer",
    "minerva": "solution",
    "olympiadbench": "answer",
    "gsm8k": "answer",
}
"""The column of ../shared/data/<benchmark>/test.jsonl that lighteval took each gold from (its README)."""

GOLD_UNPARSABLE = "gold_unparsable"
INVALID_INPUT = "invalid_input"
TIMEOUT = "timeout"
WORKER_CRASHED = "worker_crashed"
WORKER_ERROR = "worker_error"

ANSWER_PREVIEW_CHARS = 200
"""The extracted answer a verdict carries is cut to this length (it is for logs and eval rows; grading
used all of it)."""

CACHE_ENTRIES = 4096
"""Parsed strings, and verify() results, that a worker keeps (math-verify itself keeps 20 parses)."""

_CACHED_CHARS = 256  # longer strings are rare and bulky; they keep math-verify's own 20-entry cache

_STARTUP_TIMEOUT_S = 120.0
_READY = "ready"
_CACHE_STATS = "cache_stats"


class GraderStartError(RuntimeError):
    """No grader worker process could start (math-verify missing, or a machine too busy to start
    one within its start-up bound): no verdict can be trusted, so nothing is graded."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The grade of one completion against one gold.

    ``answer`` is the text of the completion's final answer as the profile extracted it (None if it
    found none). ``reason`` is set only when the pair could not be graded (``gold_unparsable``,
    ``invalid_input``, ``timeout``, ``worker_crashed``, ``worker_error:<exception>``); such a
    verdict is never correct.
    """

    correct: bool
    answer: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    """Wall-clock time this item took in its worker, as the parent saw it (0.0 if never sent)."""


# ------------------------------------------------------------------------------ in the worker


@dataclass(frozen=True)
class _Extraction:
    completion: list[Any]
    completion_mode: Literal["first_match", "any_match"]
    precision: int
    answer_first: bool  # verify() is not symmetric: which side each evaluator passed first
    alarm_s: int  # math-verify's SIGALRM bound on each parse and each comparison


_LIGHTEVAL_ALARM_S = 5  # multilingual_extractive_match_metric's timeout_seconds, unset by Open-RS
_MATH_VERIFY_ALARM_S = 3  # parse()'s and verify()'s defaults, which Open-RS's reward kept


@cache
def _extraction(profile: Profile) -> _Extraction:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    if profile == "open-rs":
        # open-rs src/open_r1/rewards.py accuracy_reward: well-formed LaTeX, boxed first, first match.
        completion = LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
        return _Extraction([completion], "first_match", 6, answer_first=True, alarm_s=_MATH_VERIFY_ALARM_S)
    # open-rs src/open_r1/evaluate.py's pred_extraction_target, listed LaTeX first as lighteval
    # sorted it, precision 5, any match.
    completion = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return _Extraction(completion, "any_match", 5, answer_first=False, alarm_s=_LIGHTEVAL_ALARM_S)


def _marks_its_answer(gold: str) -> bool:
    r"""Whether the gold delimits its answer (a ``\boxed{}``, ``$…$``, ``\(…\)`` or ``\[…\]``)."""
    if "\\boxed" in gold or "\\(" in gold or "\\[" in gold:
        return True
    return "$" in gold.replace("\\$", "")


@lru_cache(maxsize=8192)
def parse_gold(gold: str) -> list[Any]:
    """The gold as ``open-rs`` and ``lighteval-boxed-gold`` read it (see the module's docstring);
    cached, so that a worker parses a problem's gold once. Empty if it yields nothing."""
    from math_verify import LatexExtractionConfig, parse

    gold = gold.strip()
    if _marks_its_answer(gold):
        parsed = parse(gold, [LatexExtractionConfig()])
        if parsed:
            return parsed
    return parse(f"\\boxed{{{gold}}}", [LatexExtractionConfig()]) if gold else []


@lru_cache(maxsize=8192)
def gold_extraction(gold: str, profile: Profile) -> list[Any]:
    """What the profile extracts from a gold: parsed values, then the first match's normalised text
    (math-verify's fallback "first_match"). Empty if nothing matched, in which case the lighteval
    profiles compare the raw gold string (see the module's docstring). Cached per worker."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if profile in ("open-rs", "lighteval-boxed-gold"):
        return parse_gold(gold)
    # lighteval's LatexExtractionConfig() boxes at priority 55; math-verify's default is 50.
    config = ExprExtractionConfig() if profile == "lighteval-expr" else LatexExtractionConfig(boxed_match_priority=55)
    return parse(gold, [config], parsing_timeout=_LIGHTEVAL_ALARM_S)


class _Caches:
    """A worker's caches: math-verify's parsers made to keep ``entries`` strings, and verify()'s
    results for ``entries`` pairs of parsed answers. Installing them changes no verdict: a hit
    returns what the same call on the same input returned."""

    def __init__(self, entries: int) -> None:
        from math_verify import parser

        self.parsers = []
        for name in ("parse_latex_with_timeout", "parse_expr_with_timeout"):
            own = getattr(parser, name)  # lru_cache(maxsize=20); like it, ours keeps no exception
            kept = lru_cache(maxsize=entries)(own.__wrapped__)

            def parse(text: str, timeout_seconds: int, own=own, kept=kept) -> Any:
                return (kept if len(text) <= _CACHED_CHARS else own)(text, timeout_seconds)

            setattr(parser, name, parse)
            self.parsers.append(kept)
        self.entries = entries
        self.verified: OrderedDict[tuple, tuple[bool, list, list]] = OrderedDict()
        self.verify_hits = self.verify_misses = 0

    def verify(self, first: list, second: list, precision: int, alarm_s: int) -> bool:
        """math-verify's verify(first, second), remembered for inputs that are the same objects.

        Sympy objects count as the same only if they are the same object (the parse cache hands
        out one per string), so that a hit is the same call on the same input, not on an equal
        one; strings by value. A result is kept only if no alarm can have fired, so that a
        timeout is not passed on, and only for short answers, whose objects the parse cache holds
        anyway (the entry pins them: their ids stay theirs while it lives).
        """
        from math_verify import verify

        parts = [*first, *second]
        if any(isinstance(part, str) and len(part) > _CACHED_CHARS for part in parts):
            return verify(first, second, precision=precision, timeout_seconds=alarm_s)
        key = (precision, tuple(map(_identity, first)), tuple(map(_identity, second)))
        if key in self.verified:
            self.verify_hits += 1
            self.verified.move_to_end(key)
            return self.verified[key][0]
        self.verify_misses += 1
        started = time.monotonic()
        correct = verify(first, second, precision=precision, timeout_seconds=alarm_s)
        if time.monotonic() - started < alarm_s:
            self.verified[key] = (correct, first, second)
            if len(self.verified) > self.entries:
                self.verified.popitem(last=False)
        return correct

    def stats(self) -> Counter[str]:
        parses = [parser.cache_info() for parser in self.parsers]
        return Counter(
            parse_hits=sum(info.hits for info in parses),
            parse_misses=sum(info.misses for info in parses),
            verify_hits=self.verify_hits,
            verify_misses=self.verify_misses,
        )


def _identity(part: Any) -> Any:
    return part if isinstance(part, str) else id(part)


def grade_here(
    completion: str, gold: str, profile: Profile = "open-rs", caches: _Caches | None = None
) -> Verdict:
    """Grade in this process, unbounded. Only for a worker's main thread (math-verify's alarms)."""
    from math_verify import parse, verify

    gold_parsed: list[Any] = gold_extraction(gold, profile)
    if not gold_parsed:
        if profile in ("open-rs", "lighteval-boxed-gold"):
            return Verdict(False, reason=GOLD_UNPARSABLE)
        # lighteval's fallback: the raw gold, which verify() compares only with a string, stripped.
        gold_parsed = [gold]
    extraction = _extraction(profile)
    answer_parsed: list[Any] = parse(
        completion,
        extraction.completion,
        extraction_mode=extraction.completion_mode,
        parsing_timeout=extraction.alarm_s,
    )
    if not answer_parsed:
        return Verdict(False)
    # verify() turns its own errors and timeouts into False, as both Open-RS's reward and lighteval did.
    first, second = (answer_parsed, gold_parsed) if extraction.answer_first else (gold_parsed, answer_parsed)
    if caches is not None:
        correct = caches.verify(first, second, extraction.precision, extraction.alarm_s)
    else:
        correct = verify(first, second, precision=extraction.precision, timeout_seconds=extraction.alarm_s)
    # With fallback "first_match" the last element is the matched text (printing sympy can hang).
    answer = answer_parsed[-1][:ANSWER_PREVIEW_CHARS] if isinstance(answer_parsed[-1], str) else None
    return Verdict(correct, answer)


def _serve(
    conn: connection.Connection,
    profile: Profile,
    memory_limit_bytes: int | None,
    cache_entries: int,
    sll_first_parsing: bool,
) -> None:
    """A worker's main loop: receive a chunk of (index, completion, gold), answer item by item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_limit_bytes is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    if sll_first_parsing:
        from grpo_trainer import two_stage_parsing

        two_stage_parsing.install()
    grade_here("$1$", "1", profile)  # load the LaTeX parser before the first timed item
    caches = _Caches(cache_entries) if cache_entries else None
    conn.send(_READY)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        if chunk == _CACHE_STATS:
            conn.send(caches.stats() if caches else Counter())
            continue
        for index, completion, gold in chunk:
            try:
                verdict = grade_here(completion, gold, profile, caches)
            except Exception as error:  # MemoryError, RecursionError, anything math-verify let out
                verdict = Verdict(False, reason=f"{WORKER_ERROR}:{type(error).__name__}")
            conn.send((index, verdict))


# ------------------------------------------------------------------------------ in the parent


class _Worker:
    """One worker process, the items it was sent and when it started on the current one."""

    def __init__(
        self,
        context: ProcessContext,
        profile: Profile,
        memory_limit_bytes: int | None,
        cache_entries: int,
        sll_first_parsing: bool,
    ) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        args = (child_conn, profile, memory_limit_bytes, cache_entries, sll_first_parsing)
        self.process = context.Process(target=_serve, args=args, name="grpo-grader", daemon=True)
        self.process.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        self.ready = False
        self.pending: deque[tuple[int, str, str]] = deque()
        self.started = time.monotonic()  # when it started on its current item (or on starting up)
        self.deadline = self.started + _STARTUP_TIMEOUT_S

    def send(self, chunk: list[tuple[int, str, str]], timeout_s: float) -> None:
        self.pending.extend(chunk)
        self.next_item(timeout_s)
        self.conn.send(chunk)

    def next_item(self, timeout_s: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _process_context() -> ProcessContext:
    """forkserver where there is one (fresh interpreter, cheap restarts), else spawn; never fork,
    which would copy the trainer's torch/CUDA/NCCL state into the workers."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has math-verify imported already, so a restart after a
        # timeout costs milliseconds. (No effect if this process started its forkserver before.)
        context.set_forkserver_preload([__name__, "math_verify", "grpo_trainer.two_stage_parsing"])
        return context
    return multiprocessing.get_context("spawn")


class Grader:
    """Grades completions against golds in worker processes, each item bounded in time and memory.

    The pool starts on first use and is reused; a worker that exceeds ``timeout_s`` on an item, or
    dies, is replaced and that item gets a failed verdict. ``close()`` (or leaving a ``with``
    block) stops the workers; the process-wide grader of :func:`get_grader` is closed at exit.
    ``workers`` defaults to the cores this process may use; ranks sharing a node should split them.
    The lighteval profiles give each parse and comparison lighteval's 5 s alarm, and lighteval had
    no bound on a whole item: give them a ``timeout_s`` well above 5 s (30 s, say), or an item
    lighteval finished may end here as a wrong verdict with reason ``timeout``.
    Each worker caches up to ``cache_entries`` parses and verify() results (0: none), and parses
    LaTeX SLL first unless ``sll_first_parsing`` is False (then with latex2sympy's LL parser
    alone, for comparisons); see the module's docstring.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout_s: float = 5.0,
        memory_limit_mb: int | None = 2048,
        profile: Profile = "open-rs",
        cache_entries: int = CACHE_ENTRIES,
        sll_first_parsing: bool = True,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if cache_entries < 0:
            raise ValueError(f"cache_entries must be 0 or more, got {cache_entries}")
        self.workers = workers or _usable_cores()
        self.timeout_s = timeout_s
        self.profile: Profile = profile
        self.cache_entries = cache_entries
        self.sll_first_parsing = sll_first_parsing
        self._memory_limit_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
        self._pool: list[_Worker] = []
        self._pool_pid = os.getpid()
        self._context: ProcessContext | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def verify(self, completion: str, gold: str) -> Verdict:
        """Grade one completion against its gold."""
        return self.verify_batch([completion], [gold])[0]

    def verify_batch(self, completions: Sequence[str], golds: Sequence[str]) -> list[Verdict]:
        """Grade ``completions[i]`` against ``golds[i]`` for every i, in parallel; input order.

        Never raises for a bad item: a non-string, a timeout or a crashed worker is a failed
        verdict. Identical pairs are graded once. Raises GraderStartError only if no worker process can
        start at all (math-verify missing, say): no run should go on without its reward.
        """
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        verdicts: list[Verdict | None] = [None] * len(completions)
        first_of: dict[tuple[str, str], int] = {}
        todo: list[tuple[int, str, str]] = []
        for index, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
            if not isinstance(completion, str) or not isinstance(gold, str):
                verdicts[index] = Verdict(False, reason=INVALID_INPUT)
            elif (completion, gold) not in first_of:
                first_of[completion, gold] = index
                todo.append((index, completion, gold))
        if todo:
            with self._lock:
                self._run(todo, verdicts)
        for index, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
            if verdicts[index] is None:
                verdicts[index] = verdicts[first_of[completion, gold]]
        return verdicts  # type: ignore[return-value]

    def cache_stats(self) -> Counter[str]:
        """Hits and misses of the workers' caches (parse_hits, parse_misses, verify_hits,
        verify_misses), summed over the live workers: a replaced worker's counts are gone."""
        stats: Counter[str] = Counter()
        with self._lock:
            for worker in self._pool if self._pool_pid == os.getpid() else []:
                if worker.ready:
                    try:
                        worker.conn.send(_CACHE_STATS)
                        stats.update(worker.conn.recv())
                    except (EOFError, OSError):  # it died while idle; the next batch replaces it
                        pass
        return stats

    def close(self) -> None:
        """Stop the workers; a later call starts new ones."""
        with self._lock:
            if self._pool_pid == os.getpid():
                for worker in self._pool:
                    worker.stop()
            self._pool = []

    # -------------------------------------------------------------------------------- the pool

    def _start_worker(self) -> _Worker:
        if self._context is None:
            self._context = _process_context()
        return _Worker(
            self._context, self.profile, self._memory_limit_bytes, self.cache_entries, self.sll_first_parsing
        )

    def _run(self, todo: list[tuple[int, str, str]], verdicts: list[Verdict | None]) -> None:
        if self._pool_pid != os.getpid():  # a forked copy of this grader: those workers are not ours
            self._pool, self._pool_pid = [], os.getpid()
        while len(self._pool) < self.workers:
            self._pool.append(self._start_worker())
        # Items of one gold travel together, so that one worker's caches see a group's repeated
        # answers; chunks are small enough to keep every worker busy to the end.
        queue = deque(sorted(todo, key=lambda item: item[2]))
        chunk_size = max(1, min(32, math.ceil(len(queue) / (4 * self.workers))))
        remaining = len(queue)
        while remaining:
            for slot, worker in enumerate(self._pool):
                if worker.ready and not worker.pending and queue:
                    chunk = _next_chunk(queue, chunk_size)
                    try:
                        worker.send(chunk, self.timeout_s)
                    except OSError:  # it died while idle: the chunk goes back, untouched
                        worker.pending.clear()
                        queue.extendleft(reversed(chunk))
                        self._replace(slot, worker, queue, verdicts, WORKER_CRASHED)
            now = time.monotonic()
            busy = [worker for worker in self._pool if worker.pending or not worker.ready]
            wait_s = max(0.0, min(worker.deadline for worker in busy) - now)
            ready = set(connection.wait([worker.conn for worker in busy], timeout=wait_s))
            for slot, worker in enumerate(self._pool):
                if worker.conn in ready:
                    remaining -= self._receive(slot, worker, queue, verdicts)
                elif (worker.pending or not worker.ready) and time.monotonic() >= worker.deadline:
                    remaining -= self._replace(slot, worker, queue, verdicts, TIMEOUT)

    def _receive(self, slot: int, worker: _Worker, queue: deque, verdicts: list[Verdict | None]) -> int:
        """Take one message from a worker; returns how many items it settled."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return self._replace(slot, worker, queue, verdicts, WORKER_CRASHED)
        if message == _READY:
            worker.ready = True
            return 0
        index, verdict = message
        worker.pending.popleft()
        verdicts[index] = replace(verdict, seconds=time.monotonic() - worker.started)
        worker.next_item(self.timeout_s)
        return 1

    def _replace(self, slot: int, worker: _Worker, queue: deque, verdicts: list[Verdict | None], reason: str) -> int:
        """Kill a worker, fail the item it was on, requeue the rest of its chunk, start another."""
        worker.kill()
        seconds = time.monotonic() - worker.started
        if not worker.ready:
            raise GraderStartError(f"a grader worker could not start (exit code {worker.process.exitcode})")
        self._pool[slot] = self._start_worker()
        if not worker.pending:
            return 0
        index, completion, gold = worker.pending.popleft()
        queue.extendleft(reversed(worker.pending))
        cause = f"exit code {worker.process.exitcode}" if reason == WORKER_CRASHED else f"over {self.timeout_s}s"
        log.warning(
            "grading %s (%s): completion of %d chars starting %r, gold %r",
            reason, cause, len(completion), completion[:80], gold[:80],
        )
        verdicts[index] = Verdict(False, reason=reason, seconds=seconds)
        return 1


def _next_chunk(queue: deque[tuple[int, str, str]], size: int) -> list[tuple[int, str, str]]:
    """The next ``size`` items, and the rest of the last one's gold if that is ``size`` items or
    fewer: a group stays with one worker's caches, a gold with many items still goes to all."""
    chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
    rest = 0
    while rest <= size and rest < len(queue) and queue[rest][2] == chunk[-1][2]:
        rest += 1
    if rest <= size:
        chunk += [queue.popleft() for _ in range(rest)]
    return chunk


_default: Grader | None = None
_default_lock = threading.Lock()


def get_grader() -> Grader:
    """This process's grader (Open-RS extraction, default bounds), started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
            atexit.register(_default.close)
        return _default
