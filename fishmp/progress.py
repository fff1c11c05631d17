"""Progress for three audiences: a live bar for people, JSON lines for a calling backend, a callback for libraries.

The job loop emits plain dicts (`{"event": kind, "time": unix seconds, ...}`); renderers only read them.
Logs and the bar go to stderr; stdout carries machine output alone (JSON lines when asked, and the result line).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

Event = dict[str, Any]
EventCallback = Callable[[Event], None]

KINDS = ("plan", "worker_ready", "segment_done", "segment_failed", "segment_requeued", "worker_died", "finished")


def make_event(event: str, /, **fields: Any) -> Event:
    return {"event": event, "time": round(time.time(), 3), **fields}


class JsonLines:
    """One JSON object per line, flushed at once (a backend reads the pipe live)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream: IO[str] | None = stream or sys.stdout

    def __call__(self, ev: Event) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps(ev, ensure_ascii=False) + "\n")
            self.stream.flush()
        except BrokenPipeError:  # the reader went away: the job goes on, its results are on disk
            self.stream = None

    def close(self) -> None:
        pass


class _Tally:
    def __init__(self) -> None:
        self.total = self.done = self.failed = 0
        self.audio_s = 0.0
        self.t0 = time.monotonic()

    def update(self, ev: Event) -> None:
        kind = ev["event"]
        if kind == "plan":
            self.total = ev["segments"] - ev["skipped"]
            self.t0 = time.monotonic()
        elif kind == "segment_done" and not ev.get("skipped"):
            self.done += 1
            self.audio_s += ev.get("audio_seconds") or 0.0
        elif kind == "segment_failed":
            self.failed += 1

    def eta_s(self) -> float | None:
        finished = self.done + self.failed
        if not finished:
            return None
        return (time.monotonic() - self.t0) / finished * (self.total - finished)


class PlainLines:
    """Non-TTY default: one readable line per event on stderr."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tally = _Tally()

    def __call__(self, ev: Event) -> None:
        self.tally.update(ev)
        t, kind = self.tally, ev["event"]
        if kind == "plan":
            line = (f"[Main] {ev['segments'] - ev['skipped']} segments to synthesize ({ev['skipped']} already done), "
                    f"{ev['speakers']} speakers, {ev['workers']} workers")
        elif kind == "worker_ready":
            line = f"[Worker {ev['worker']}] ready on {ev['device']} (pid {ev['pid']}, loaded in {ev['load_seconds']:.1f}s)"
        elif kind == "segment_done" and not ev.get("skipped"):
            eta = t.eta_s()
            line = (f"[{t.done + t.failed}/{t.total}] {ev['id']} done: {ev['audio_seconds']:.1f}s audio in "
                    f"{ev['synthesis_seconds']:.1f}s by {ev['worker']}" + (f", ETA {eta:.0f}s" if eta is not None else ""))
        elif kind == "segment_failed":
            line = f"[{t.done + t.failed}/{t.total}] {ev['id']} FAILED ({ev['kind']}): {ev['error']}"
        elif kind == "segment_requeued":
            line = f"[Main] {ev['id']} requeued ({ev['attempts']} failed attempts so far): {ev['reason']}"
        elif kind == "worker_died":
            line = f"[Worker {ev['worker']}] on {ev['device']} (pid {ev['pid']}) stopped: {ev['reason']}"
        elif kind == "finished":
            line = (f"[Main] finished: {ev['done']} done, {ev['failed']} failed, {ev['pending']} pending, "
                    f"{ev['audio_seconds']:.1f}s audio in {ev['wall_seconds']:.1f}s")
        else:
            return
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class LegacyLines(PlainLines):
    """Plain lines plus what the dubbing backends' own scripts printed, so their clients' progress parsers work
    unchanged: per finished segment `[BatchGen] 进度: N/M` (the single-process script) and `[Main] Generated N/M
    segments` (the multiprocess one), and at the end `[Main] All done! Processed N/M segments`. N counts every
    finished task (done, failed, resumed, or skipped as invalid: `already`), so it only grows, to M = the tasks in the
    config. On stderr, as the old scripts did: their clients read stderr merged into stdout, or on its own, and
    stdout's last line stays the result."""

    def __init__(self, stream: IO[str] | None = None, items: int | None = None, already: int = 0) -> None:
        super().__init__(stream)
        self.items, self.finished, self.invalid = items, already, already

    def __call__(self, ev: Event) -> None:
        super().__call__(ev)
        kind = ev["event"]
        if kind == "plan" and self.items is None:
            self.items = ev["segments"] + self.invalid
        if kind in ("segment_done", "segment_failed"):
            self.finished += 1
            n, m = self.finished, self.items
            print(f"[BatchGen] 进度: {n}/{m}\n[Main] Generated {n}/{m} segments", file=self.stream, flush=True)
        elif kind == "finished" and not ev["pending"]:
            print(f"[Main] All done! Processed {self.finished}/{self.items} segments ({ev['done']} done, "
                  f"{ev['failed']} failed, {self.invalid} invalid)", file=self.stream, flush=True)


class Bar:
    """TTY default: a tqdm bar with segments done/total, audio seconds produced and ETA; notable events above it."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tally = _Tally()
        self.bar: Any = None  # created at the plan event, after the plan's log lines

    def __call__(self, ev: Event) -> None:
        from tqdm import tqdm

        self.tally.update(ev)
        kind = ev["event"]
        if kind == "plan":
            if self.bar is None:
                self.bar = tqdm(total=0, unit="seg", file=self.stream, dynamic_ncols=True, leave=True)
            self.bar.reset(total=ev["segments"] - ev["skipped"])
        elif self.bar is None:
            return
        elif kind in ("segment_done", "segment_failed") and not ev.get("skipped"):
            self.bar.update(1)
            self.bar.set_postfix(audio=f"{self.tally.audio_s:.0f}s", failed=self.tally.failed, refresh=False)
            if kind == "segment_failed":
                self.bar.write(f"{ev['id']} FAILED ({ev['kind']}): {ev['error']}", file=self.stream)
        elif kind == "worker_died":
            self.bar.write(f"[Worker {ev['worker']}] stopped: {ev['reason']}", file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_renderer(mode: str, stdout: IO[str] | None = None, stderr: IO[str] | None = None, *,
                  items: int | None = None, already: int = 0) -> Any:
    """`auto` is the bar on a TTY and plain lines otherwise; `none` renders nothing. `legacy` (LegacyLines) counts
    `items` tasks in all, `already` of them finished before the job starts (left out as invalid)."""
    err = stderr or sys.stderr
    if mode == "legacy":
        return LegacyLines(err, items, already)
    if mode == "auto":
        mode = "bar" if err.isatty() else "plain"
    if mode == "bar":
        return Bar(err)
    if mode == "jsonl":
        return JsonLines(stdout or sys.stdout)
    if mode == "plain":
        return PlainLines(err)
    return None
