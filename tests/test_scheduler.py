"""The scheduling rules, driven by a small discrete-time simulation of workers pulling tasks."""

from __future__ import annotations

import heapq

from fishmp.scheduler import Scheduler, Task


def tasks(spec: dict[str, list[float]]) -> list[Task]:
    return [Task(f"{s}-{i}", s, c) for s, costs in spec.items() for i, c in enumerate(costs)]


def simulate(sched: Scheduler, workers: int) -> tuple[float, dict[str, list[Task]]]:
    """Each worker pulls when free; returns the makespan and what each worker ran, in order."""
    ran: dict[str, list[Task]] = {f"w{i}": [] for i in range(workers)}
    free = [(0.0, f"w{i}") for i in range(workers)]
    heapq.heapify(free)
    end = 0.0
    while free:
        t, w = heapq.heappop(free)
        task = sched.next_for(w)
        if task is None:
            end = max(end, t)
            continue
        ran[w].append(task)
        sched.done(task.id)
        heapq.heappush(free, (t + task.cost, w))
    return end, ran


def test_one_speaker_four_workers_all_work() -> None:
    sched = Scheduler(tasks({"a": [10.0] * 20}))
    makespan, ran = simulate(sched, 4)
    assert all(len(r) == 5 for r in ran.values())
    assert makespan == 50.0
    assert sched.all_finished


def test_worker_keeps_its_speaker_while_it_has_work() -> None:
    sched = Scheduler(tasks({"a": [5.0] * 6, "b": [5.0] * 6}))
    _, ran = simulate(sched, 2)
    for r in ran.values():
        assert len({t.speaker for t in r}) == 1  # no switching: each worker stayed on one speaker


def test_free_worker_takes_unheld_speaker_with_most_work() -> None:
    sched = Scheduler(tasks({"small": [1.0], "big": [9.0, 9.0], "mid": [5.0]}))
    assert sched.next_for("w0").speaker == "big"
    assert sched.next_for("w1").speaker == "mid"
    assert sched.next_for("w2").speaker == "small"


def test_longest_first_within_speaker() -> None:
    sched = Scheduler(tasks({"a": [1.0, 7.0, 3.0, 5.0]}))
    got = [sched.next_for("w0").cost for _ in range(4)]
    assert got == [7.0, 5.0, 3.0, 1.0]
    assert sched.next_for("w0") is None


def test_six_skewed_speakers_four_workers_near_optimal() -> None:
    spec = {"s0": [40.0] * 10, "s1": [10.0] * 5, "s2": [8.0] * 4, "s3": [3.0] * 3, "s4": [2.0] * 2, "s5": [1.0]}
    sched = Scheduler(tasks(spec))
    makespan, ran = simulate(sched, 4)
    total = sum(sum(v) for v in spec.values())
    lower = max(total / 4, 40.0)
    assert makespan <= lower * 4 / 3  # the LPT bound
    # The dominant speaker's work was shared among several workers.
    assert sum(1 for r in ran.values() if any(t.speaker == "s0" for t in r)) >= 3
    assert sorted(t.id for r in ran.values() for t in r) == sorted(sched.tasks)


def test_shared_speaker_is_joined_by_most_work_per_holder() -> None:
    sched = Scheduler(tasks({"a": [1.0] * 100, "b": [1.0] * 10}))
    assert sched.next_for("w0").speaker == "a"
    assert sched.next_for("w1").speaker == "b"
    # Every speaker is held: the third worker joins the one with most work per holder.
    assert sched.next_for("w2").speaker == "a"
    assert sched.holders("a") == 2


def test_requeue_counts_attempts_and_declares_poison() -> None:
    sched = Scheduler(tasks({"a": [1.0, 2.0]}), max_attempts=3)
    t = sched.next_for("w0")
    assert sched.requeue(t.id) and sched.tasks[t.id].attempts == 1
    assert sched.next_for("w1").id == t.id  # back in line, still the longest
    assert sched.requeue(t.id)
    sched.next_for("w1")
    assert not sched.requeue(t.id)  # third death: poison, the caller fails it
    sched.failed(t.id)
    assert sched.finished[t.id] == "failed"


def test_requeue_without_attempt_for_interrupted_work() -> None:
    sched = Scheduler(tasks({"a": [1.0]}), max_attempts=1)
    t = sched.next_for("w0")
    assert sched.requeue(t.id, count_attempt=False)
    assert sched.tasks[t.id].attempts == 0


def test_fail_pending_speaker_segments() -> None:
    sched = Scheduler(tasks({"a": [1.0, 2.0, 3.0], "b": [1.0]}))
    first = sched.next_for("w0")
    assert first.speaker == "a"
    for tid in sched.pending_of_speaker("a"):
        sched.failed(tid)
    sched.failed(first.id)
    assert sched.next_for("w0").speaker == "b"
    assert sched.pending_count == 0


def test_worker_gone_releases_speaker() -> None:
    sched = Scheduler(tasks({"a": [1.0] * 3, "b": [1.0] * 3}))
    sched.next_for("w0")
    sched.worker_gone("w0")
    assert sched.holders("a") == 0


def test_max_cost_leaves_a_long_task_pending() -> None:
    sched = Scheduler(tasks({"a": [10.0, 2.0]}))
    assert sched.next_for("w0", max_cost=5.0) is None  # the 10 is too long to commit early
    assert sched.pending_count == 2 and sched.pending_total_cost == 12.0
    assert sched.next_for("w0").cost == 10.0
    assert sched.next_for("w0", max_cost=5.0).cost == 2.0
