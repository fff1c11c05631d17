"""Progress for three audiences: a live bar for people, JSON lines for a calling backend, a callback for libraries.

The job loop emits plain dicts (`{"event": kind, "time": unix seconds, ...}`); renderers only read them.
Logs and the bar go to stderr; stdout carries machine output alone (JSON lines when asked, and the result line).
The dubbing backends' clients echo only lines containing one of `LEGACY_MARKERS`: every plain line that reports a
problem carries one (`[Main]`, `[Worker ...]`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

Event = dict[str, Any]
EventCallback = Callable[[Event], None]

KINDS = ("plan", "worker_ready", "segment_done", "segment_failed", "segment_requeued", "worker_died", "worker_recycled",
         "gpu", "finished")
LEGACY_MARKERS = ("[BatchGen]", "[Worker", "[Main]", "[GPU", "tokens/sec", "INFO")  # what those clients echo
GPU_LINE_EVERY_S = 60.0  # plain lines: one GPU line per this many seconds (events come every few seconds)


def make_event(event: str, /, **fields: Any) -> Event:
    return {"event": event, "time": round(time.time(), 3), **fields}


def gpu_brief(ev: Event) -> str:
    """A `gpu` event in a few characters per GPU: `gpu0 12.3/80G 95%` (no utilisation when NVML cannot say)."""
    parts = []
    for g in ev.get("gpus", ()):
        util = f" {g['util_pct']:.0f}%" if g.get("util_pct") is not None else ""
        parts.append(f"gpu{g['index']} {g['used_gib']:.1f}/{g['total_gib']:.0f}G{util}")
    return " ".join(parts)


def gpu_summary_lines(gpus: dict[str, dict]) -> list[str]:
    """The `finished` event's per-GPU peak/mean, one line each."""
    lines = []
    for index, g in gpus.items():
        util = (f", utilisation peak {g['util_pct_peak']:.0f}% mean {g['util_pct_mean']:.0f}%"
                if g.get("util_pct_mean") is not None else "")
        lines.append(f"[GPU {index}] {g['name']}: memory used peak {g['used_gib_peak']:.2f} GiB, mean "
                     f"{g['used_gib_mean']:.2f} of {g['total_gib']:.1f} GiB{util} ({g['samples']} samples)")
    return lines


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
        self.last_gpu_line = float("-inf")

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
        elif kind == "segment_failed":  # [Main]: the dubbing backends' clients echo only lines with their markers
            line = f"[Main] [{t.done + t.failed}/{t.total}] {ev['id']} FAILED ({ev['kind']}): {ev['error']}"
        elif kind == "segment_requeued":
            line = f"[Main] {ev['id']} requeued ({ev['attempts']} failed attempts so far): {ev['reason']}"
        elif kind == "worker_died":
            line = f"[Worker {ev['worker']}] on {ev['device']} (pid {ev['pid']}) stopped: {ev['reason']}"
        elif kind == "worker_recycled":
            line = f"[Worker {ev['worker']}] on {ev['device']} (pid {ev['pid']}) recycled: {ev['reason']}"
        elif kind == "gpu":
            if time.monotonic() - self.last_gpu_line < GPU_LINE_EVERY_S:
                return
            self.last_gpu_line = time.monotonic()
            line = f"[Main] {gpu_brief(ev)}"
        elif kind == "finished":
            line = "\n".join([f"[Main] finished: {ev['done']} done, {ev['failed']} failed, {ev['pending']} pending, "
                              f"{ev['audio_seconds']:.1f}s audio in {ev['wall_seconds']:.1f}s"
                              + (f"; manifest NOT written: {ev['manifest_error']}" if ev.get("manifest_error") else ""),
                              *gpu_summary_lines(ev.get("gpus") or {})])
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
        self.gpu = ""  # the latest `gpu` event, shown in the bar's postfix (empty: no GPU sampled)

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
            self._postfix(refresh=False)
            if kind == "segment_failed":
                self.bar.write(f"{ev['id']} FAILED ({ev['kind']}): {ev['error']}", file=self.stream)
        elif kind == "gpu":
            self.gpu = gpu_brief(ev)
            self._postfix(refresh=True)
        elif kind == "worker_died":
            self.bar.write(f"[Worker {ev['worker']}] stopped: {ev['reason']}", file=self.stream)
        elif kind == "worker_recycled":
            self.bar.write(f"[Worker {ev['worker']}] recycled: {ev['reason']}", file=self.stream)
        elif kind == "finished":
            for line in gpu_summary_lines(ev.get("gpus") or {}):
                self.bar.write(line, file=self.stream)

    def _postfix(self, refresh: bool) -> None:
        fields: dict[str, Any] = {"audio": f"{self.tally.audio_s:.0f}s", "failed": self.tally.failed}
        if self.gpu:
            fields["gpu"] = self.gpu
        self.bar.set_postfix(refresh=refresh, **fields)

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
