"""Which segment each worker runs next. Pure policy: no processes, no I/O, so it is tested in isolation.

Rules (each exists for a measured reason, see README "Scheduling"):
- Workers pull; a worker keeps its current speaker while that speaker has pending work, so the speaker's prompt
  stays prepared in that worker.
- A worker that needs a speaker takes the one with the most pending work that no worker holds.
- When every speaker with pending work is held, it joins the one with the most pending work per holder, so no
  worker idles while work remains (1 speaker x 4 workers: all four work).
- Within a speaker, longest segments first (LPT keeps the tail short).
- A segment whose worker died comes back with attempts + 1; after `max_attempts` deaths it is poison and fails.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Task:
    id: str
    speaker: str
    cost: float  # expected work, e.g. characters of text
    attempts: int = 0  # times a worker died while holding it


class Scheduler:
    def __init__(self, tasks: list[Task], max_attempts: int = 3) -> None:
        self.tasks = {t.id: t for t in tasks}
        self.max_attempts = max_attempts
        # Pending tasks per speaker, sorted ascending by cost so the longest pops from the end in O(1).
        self._pending: dict[str, list[Task]] = defaultdict(list)
        for t in tasks:
            self._pending[t.speaker].append(t)
        for lst in self._pending.values():
            lst.sort(key=lambda t: (t.cost, t.id))
        self._pending_cost = {s: sum(t.cost for t in lst) for s, lst in self._pending.items()}
        self._holder: dict[str, str] = {}  # worker -> speaker it holds
        self.outstanding: set[str] = set()  # handed out, not yet finished
        self.finished: dict[str, str] = {}  # task id -> "done" | "failed"

    # -- queries ----------------------------------------------------------------------------------------------
    @property
    def pending_count(self) -> int:
        return sum(len(v) for v in self._pending.values())

    @property
    def all_finished(self) -> bool:
        return len(self.finished) == len(self.tasks)

    def holders(self, speaker: str) -> int:
        return sum(1 for s in self._holder.values() if s == speaker)

    # -- decisions --------------------------------------------------------------------------------------------
    @property
    def pending_total_cost(self) -> float:
        return sum(self._pending_cost.values())

    def next_for(self, worker: str, max_cost: float | None = None) -> Task | None:
        """The next task for `worker`, or None when nothing is pending (or its next task costs more than `max_cost`:
        a long segment is better left for whichever worker frees up first than queued behind a running one)."""
        speaker = self._holder.get(worker)
        if speaker is None or not self._pending.get(speaker):
            speaker = self._choose_speaker(worker)
            if speaker is None:
                self._holder.pop(worker, None)
                return None
            self._holder[worker] = speaker
        if max_cost is not None and self._pending[speaker][-1].cost > max_cost:
            return None
        task = self._pending[speaker].pop()
        self._pending_cost[speaker] -= task.cost
        self.outstanding.add(task.id)
        return task

    def _choose_speaker(self, worker: str) -> str | None:
        self._holder.pop(worker, None)
        live = [s for s, lst in self._pending.items() if lst]
        if not live:
            return None
        held = set(self._holder.values())
        free = [s for s in live if s not in held]
        if free:
            return max(free, key=lambda s: (self._pending_cost[s], s))
        return max(live, key=lambda s: (self._pending_cost[s] / self.holders(s), s))

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
        lst = self._pending[task.speaker]
        lst.append(task)
        lst.sort(key=lambda t: (t.cost, t.id))
        self._pending_cost[task.speaker] = self._pending_cost.get(task.speaker, 0.0) + task.cost
        return True

    def pending_of_speaker(self, speaker: str) -> list[str]:
        return [t.id for t in self._pending.get(speaker, [])]

    def worker_gone(self, worker: str) -> None:
        self._holder.pop(worker, None)

    def _drop_pending(self, task_id: str) -> None:
        task = self.tasks[task_id]
        lst = self._pending.get(task.speaker, [])
        if task in lst:
            lst.remove(task)
            self._pending_cost[task.speaker] -= task.cost
