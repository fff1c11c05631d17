"""Which segment each worker runs next. Pure policy: no processes, no I/O, so it is tested in isolation.

Rules (each exists for a measured reason, see README "Scheduling"):
- Workers pull, one task per free lane (batch row); a worker keeps its current speaker while that speaker has
  pending work, so the speaker's prompt and prefix KV stay prepared in that worker. Affinity is a preference, never
  a reason to leave a lane empty: a worker's batch holds rows of several speakers (mixed voices), so when its
  speaker has nothing left it takes the next speaker's task at once, and `next_for` returns a task whenever any is
  pending (a queued-ahead task's `max_cost` aside).
- A worker that needs a speaker takes the one with the most pending work that no worker holds.
- When every speaker with pending work is held, it joins the one with the most pending work per holder, so no
  worker idles while work remains (1 speaker x 4 workers: all four work).
- Within a speaker, longest segments first (LPT keeps the tail short).
- A segment whose worker died comes back with attempts + 1; after `max_attempts` deaths it is poison and fails.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Task:
    id: str
    speaker: str
    cost: float  # expected work, e.g. characters of text
    attempts: int = 0  # times a worker died while holding it


def _order(t: Task) -> tuple[float, str]:
    return (t.cost, t.id)


class Scheduler:
    """Choosing a speaker is O(log speakers): two heaps with lazy invalidation replace a scan of every speaker
    (5,000 one-segment speakers made that O(speakers^2) per job). `_free` holds speakers with pending work and no
    holder, keyed by (pending cost, name); `_shared` holds held ones keyed by (pending cost / holders, name). Every
    change of a speaker's pending cost or holders bumps its version and pushes a fresh entry to the heap its state
    belongs to; an entry whose version is not current is dropped when it reaches the top."""

    def __init__(self, tasks: list[Task], max_attempts: int = 3) -> None:
        self.tasks = {t.id: t for t in tasks}
        self.max_attempts = max_attempts
        # Pending tasks per speaker, sorted ascending by cost so the longest pops from the end in O(1).
        self._pending: dict[str, list[Task]] = defaultdict(list)
        for t in tasks:
            self._pending[t.speaker].append(t)
        for lst in self._pending.values():
            lst.sort(key=_order)
        self._pending_cost = {s: sum(t.cost for t in lst) for s, lst in self._pending.items()}
        self._pending_n = len(tasks)
        self._total_cost = sum(self._pending_cost.values())
        self._holder: dict[str, str] = {}  # worker -> speaker it holds
        self._n_holders: dict[str, int] = defaultdict(int)
        # Ties go to the greater name, as max() over (cost, name) did: rank = position in name order.
        self._rank = {s: i for i, s in enumerate(sorted(self._pending))}
        self._version: dict[str, int] = defaultdict(int)
        self._free: list[tuple[float, int, int, str]] = []  # (-pending cost, -rank, version, speaker)
        self._shared: list[tuple[float, int, int, str]] = []  # (-pending cost / holders, -rank, version, speaker)
        for speaker in self._pending:
            self._touch(speaker)
        self.outstanding: set[str] = set()  # handed out, not yet finished
        self.finished: dict[str, str] = {}  # task id -> "done" | "failed"

    # -- queries ----------------------------------------------------------------------------------------------
    @property
    def pending_count(self) -> int:
        return self._pending_n

    @property
    def all_finished(self) -> bool:
        return len(self.finished) == len(self.tasks)

    def holders(self, speaker: str) -> int:
        return self._n_holders.get(speaker, 0)

    # -- decisions --------------------------------------------------------------------------------------------
    @property
    def pending_total_cost(self) -> float:
        return self._total_cost

    def next_for(self, worker: str, max_cost: float | None = None) -> Task | None:
        """The next task for `worker`, or None when nothing is pending (or its next task costs more than `max_cost`:
        a long segment is better left for whichever worker frees up first than queued behind a running one)."""
        speaker = self._holder.get(worker)
        if speaker is None or not self._pending.get(speaker):
            speaker = self._choose_speaker(worker)
            if speaker is None:
                return None
            self._set_holder(worker, speaker)
        if max_cost is not None and self._pending[speaker][-1].cost > max_cost:
            return None
        task = self._pending[speaker].pop()
        self._remove_cost(task)
        self.outstanding.add(task.id)
        return task

    def _choose_speaker(self, worker: str) -> str | None:
        """The unheld speaker with the most pending work, else the one with the most pending work per holder."""
        self._set_holder(worker, None)
        if not self._pending_n:
            return None
        return self._top(self._free) or self._top(self._shared)

    def _top(self, heap: list[tuple[float, int, int, str]]) -> str | None:
        while heap:
            _, _, version, speaker = heap[0]
            if version == self._version[speaker] and self._pending[speaker]:
                return speaker
            heapq.heappop(heap)  # stale: the speaker changed since this entry was pushed
        return None

    def _touch(self, speaker: str) -> None:
        """The speaker's pending cost or holders changed: a fresh heap entry for its new state."""
        self._version[speaker] += 1
        if not self._pending[speaker]:
            return
        n, cost = self._n_holders[speaker], self._pending_cost[speaker]
        key = -cost if n == 0 else -(cost / n)
        heapq.heappush(self._free if n == 0 else self._shared, (key, -self._rank[speaker], self._version[speaker],
                                                               speaker))

    def _set_holder(self, worker: str, speaker: str | None) -> None:
        old = self._holder.pop(worker, None)
        if old is not None:
            self._n_holders[old] -= 1
            self._touch(old)
        if speaker is not None:
            self._holder[worker] = speaker
            self._n_holders[speaker] += 1
            self._touch(speaker)

    def _remove_cost(self, task: Task) -> None:
        self._pending_cost[task.speaker] -= task.cost
        self._pending_n -= 1
        self._total_cost -= task.cost
        self._touch(task.speaker)

    # -- outcomes ---------------------------------------------------------------------------------------------
    def done(self, task_id: str) -> None:
        self.outstanding.discard(task_id)
        self.finished[task_id] = "done"

    def failed(self, task_id: str) -> None:
        self.outstanding.discard(task_id)
        self._drop_pending(task_id)
        self.finished[task_id] = "failed"

    def requeue(self, task_id: str, count_attempt: bool = True) -> bool:
        """Put an unfinished task back (its worker died or was stopped). False if it is now poison (caller fails it)."""
        task = self.tasks[task_id]
        self.outstanding.discard(task_id)
        if count_attempt:
            task.attempts += 1
            if task.attempts >= self.max_attempts:
                return False
        bisect.insort(self._pending[task.speaker], task, key=_order)
        self._pending_cost[task.speaker] = self._pending_cost.get(task.speaker, 0.0) + task.cost
        self._pending_n += 1
        self._total_cost += task.cost
        self._touch(task.speaker)
        return True

    def pending_of_speaker(self, speaker: str) -> list[str]:
        return [t.id for t in self._pending.get(speaker, [])]

    def worker_gone(self, worker: str) -> None:
        self._set_holder(worker, None)

    def _drop_pending(self, task_id: str) -> None:
        task = self.tasks[task_id]
        lst = self._pending.get(task.speaker, [])
        if task in lst:
            lst.remove(task)
            self._remove_cost(task)
