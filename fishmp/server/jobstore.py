"""Jobs submitted over HTTP, kept under the data directory so a restarted server lists them and resumes the
unfinished ones (as `generate` resumes: from the job's manifest, redoing only what is not done).

    <data dir>/jobs/<id>/request.json   the body as it came
                        job.json       the job as it runs: each speaker's reference resolved to its file
                                       (stored voices and data URLs), so a later rename or delete cannot break it
                        meta.json      {"id", "created_at"}
                        events.jsonl   every event of every run, in order (the event stream replays it)
                        out/           the wavs and manifest.json

Events come in on the event loop (state.Submission); each is appended to the log, folded into the job's view
(jobview.py) and wakes the job's event-stream readers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
import uuid
from typing import Any

from ..job import JobError, job_from_dict
from ..worker.files import atomic_write_bytes
from .errors import ApiError, scrub
from .jobview import TERMINAL, JobView
from .lines import check_text
from .paths import check_job_paths
from .state import ServerState, Submission

log = logging.getLogger("fishmp")
JOB_PRIORITY = 1.0


class StoredJob:
    def __init__(self, job_id: str, directory: str, view: JobView, events: list[dict]) -> None:
        self.id, self.dir, self.view, self.events = job_id, directory, view, events
        self.sub: Submission | None = None
        self._changed = asyncio.Event()

    @property
    def out(self) -> str:
        return os.path.join(self.dir, "out")

    def waiter(self) -> asyncio.Event:
        """Set at the next event: take it before looking at `events`, then wait on it."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def final_at(self, index: int) -> bool:
        """Event `index` ends the job's stream: the last event of a job that will not run again (its `finished`, or
        a review event after it) while no retake of it is running."""
        return index == len(self.events) - 1 and self.view.over and not self.view.retaking


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def json_text(value: Any) -> str:
    """JSON for the data dir and event streams: UTF-8 text as is, anything that UTF-8 cannot hold escaped."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def _resolved(body: dict, job: Any) -> dict:
    """The job as it runs: speakers by their files (absolute), segments and params as given (a legacy config's
    tasks as the segments they became)."""
    speakers = {}
    for sid, sp in job.speakers.items():
        key, path = ("prompt_tokens", sp.prompt_tokens) if sp.prompt_tokens else ("reference_audio", sp.reference_audio)
        speakers[sid] = {key: path, "reference_text": sp.reference_text,
                         **({"_reference_id": sp.reference_id} if sp.reference_id else {})}
    if job.legacy is not None:
        segments = [{"id": seg.id, "speaker": seg.speaker, "text": seg.text, "params": seg.params.to_dict(),
                     "output": os.path.relpath(seg.output, job.output_dir)} for seg in job.segments]
        return {"speakers": speakers, "segments": segments}
    return {"speakers": speakers, "segments": body["segments"], **({"params": body["params"]} if "params" in body else {})}


class JobStore:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.dir = os.path.join(state.data_dir, "jobs")
        self.jobs: dict[str, StoredJob] = {}

    # -- start-up --------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Every job of the data directory, its view rebuilt from its event log. A job whose files cannot be read
        (cut short, edited, not fishmp's) is listed as `damaged`, with why; the others are served as usual."""
        os.makedirs(self.dir, exist_ok=True)
        found = []
        for job_id in os.listdir(self.dir):
            directory = os.path.join(self.dir, job_id)
            if not os.path.isdir(directory):
                continue
            try:
                found.append(self._load_one(job_id, directory))
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else (exc.strerror or str(exc))
                log.warning("[Serve] job %s is damaged (%s): listed as such, not run", job_id, why)
                found.append(self._damaged(job_id, directory, why))
        for sj in sorted(found, key=lambda j: j.view.created_at):
            self.jobs[sj.id] = sj

    def _load_one(self, job_id: str, directory: str) -> StoredJob:
        meta, data = _read_json(os.path.join(directory, "meta.json")), _read_json(os.path.join(directory, "job.json"))
        if not isinstance(meta, dict) or not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            raise ValueError("meta.json or job.json is not what fishmp writes")
        events = self._read_events(directory)
        view = JobView(job_id, float(meta.get("created_at", 0.0)), self._segments(data))
        for ev in events:
            view.apply(ev)
        return StoredJob(job_id, directory, view, events)

    @staticmethod
    def _damaged(job_id: str, directory: str, why: str) -> StoredJob:
        try:
            created = os.stat(directory).st_mtime
        except OSError:
            created = 0.0
        view = JobView(job_id, created, [])
        view.status, view.error = "damaged", f"its files in the data dir cannot be read ({why[:300]})"
        return StoredJob(job_id, directory, view, [])

    @staticmethod
    def _read_events(directory: str) -> list[dict]:
        events = []
        path = os.path.join(directory, "events.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        ev = json.loads(line)
                    except ValueError:  # a line cut short by a kill: the rest of the log is still good
                        continue
                    if isinstance(ev, dict) and isinstance(ev.get("event"), str) and isinstance(ev.get("id", ""), str):
                        events.append(ev)
        return events

    @staticmethod
    def _segments(data: dict) -> list[dict]:
        segs = [{"id": s.get("id") or f"{i + 1:04d}", "speaker": s.get("speaker"), "text": s.get("text")}
                for i, s in enumerate(data.get("segments", [])) if isinstance(s, dict)]
        return [s for s in segs if isinstance(s["id"], str)]

    def resume_all(self) -> int:
        """Submit again every job a previous server did not finish. Returns how many."""
        n = 0
        for sj in self.jobs.values():
            if sj.view.status in TERMINAL:
                continue
            try:
                job = job_from_dict(_read_json(os.path.join(sj.dir, "job.json")), sj.dir, sj.out)
            except (JobError, OSError, ValueError) as exc:
                self._finish_with_error(sj, f"cannot resume: {exc}")
                continue
            sj.view.resumed()
            self._submit(sj, job, force=True)
            n += 1
        return n

    # -- requests --------------------------------------------------------------------------------------------------
    async def create(self, body: Any) -> StoredJob:
        """A job from a request body: checked (a film's thousands of segments beside the event loop), stored and
        submitted; ApiError otherwise, and then nothing is left on disk."""
        state = self.state
        if not isinstance(body, dict):
            raise ApiError(400, "invalid job", "a job is a JSON object with speakers and segments (python -m fishmp "
                           "schema prints its JSON Schema)")
        for key, why in (("output_dir", "the server keeps each job's wavs under its data dir (GET "
                          "/v1/jobs/{id}/archive)"), ("checkpoint_dir", "the server runs the checkpoint it started with")):
            if key in body:
                raise ApiError(400, "invalid job", f"{key}: {why}; leave it out")
        items = body.get("segments", body.get("tasks"))
        state.gate.check(len(items) if isinstance(items, list) else 0)  # the bound first: no work for a refusal
        job_id = uuid.uuid4().hex[:16]
        directory = os.path.join(self.dir, job_id)
        job, resolved = await asyncio.to_thread(self._check, body, os.path.join(directory, "out"))
        state.check_accepting()
        created = time.time()
        try:
            await asyncio.to_thread(self._write, directory, job_id, created, body, resolved)
            sj = StoredJob(job_id, directory, JobView(job_id, created, self._segments(resolved)), [])
            self._submit(sj, job)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # refused (429, 503) or failed: nothing was accepted
            raise
        self.jobs[job_id] = sj
        return sj

    def _check(self, body: dict, out: str) -> tuple[Any, dict]:
        """(the Job, job.json's content) for a body; ApiError naming every problem. Blocking: off the loop."""
        state = self.state
        data = check_job_paths(body, state.root)
        try:
            job = job_from_dict(data, state.root or state.data_dir, out, voices=state.refs)
        except JobError as exc:
            raise ApiError(400, "invalid job", [scrub(p, state) for p in exc.problems]) from None
        for seg in job.segments:
            check_text(state, seg.text, f'segment "{seg.id}": text')
            if any(piece in (".", "..") for piece in re.split(r"[/\\]", seg.id)):
                raise ApiError(400, "invalid job", f'segment "{seg.id}": an id is a name; "." and ".." cannot be '
                               "parts of it")
        return job, _resolved(body, job)

    @staticmethod
    def _write(directory: str, job_id: str, created: float, body: dict, resolved: dict) -> None:
        os.makedirs(directory)
        atomic_write_bytes(os.path.join(directory, "request.json"), json_text(body).encode())
        atomic_write_bytes(os.path.join(directory, "job.json"), json_text(resolved).encode())
        atomic_write_bytes(os.path.join(directory, "meta.json"), json_text({"id": job_id, "created_at": created}).encode())

    def get(self, job_id: str) -> StoredJob:
        sj = self.jobs.get(job_id)
        if sj is None:
            raise ApiError(404, "unknown job", f"no job {job_id!r} (GET /v1/jobs lists them)")
        return sj

    def cancel(self, job_id: str) -> StoredJob:
        sj = self.get(job_id)
        if sj.view.over or sj.sub is None:
            raise ApiError(409, "job is over", f"job {job_id} is {sj.view.status}: nothing to cancel")
        sj.sub.cancel()
        return sj

    # -- running ---------------------------------------------------------------------------------------------------
    def _submit(self, sj: StoredJob, job: Any, force: bool = False) -> None:
        sj.sub = Submission(self.state, job, sj.out, priority=JOB_PRIORITY, resume=True,
                            on_event=lambda ev: self.record(sj, ev), force=force)
        self.state.background(self._watch(sj, sj.sub))

    async def _watch(self, sj: StoredJob, sub: Submission) -> None:
        await sub.ended()
        if sub.finished is None:  # it never started (e.g. the output directory is held by another process)
            self._finish_with_error(sj, str(sub.error() or "the job ended without finishing"))

    def _finish_with_error(self, sj: StoredJob, error: str) -> None:
        log.error("[Serve] job %s: %s", sj.id, error)
        self.record(sj, {"event": "finished", "time": round(time.time(), 3), "error": error, "exit_code": 2,
                          "done": 0, "failed": 0, "pending": len(sj.view.segments)})

    def record(self, sj: StoredJob, ev: dict) -> None:
        sj.events.append(ev)
        try:
            with open(os.path.join(sj.dir, "events.jsonl"), "a", encoding="utf-8") as f:
                f.write(json_text(ev) + "\n")
        except OSError as exc:  # a full disk must not stop the job; the stream in memory goes on
            log.error("[Serve] cannot append to %s/events.jsonl: %s", sj.dir, exc.strerror or exc)
        sj.view.apply(ev)
        sj.notify()

    async def stop_streams(self) -> None:
        """At shutdown: wake every reader so the streams of jobs that ended can close."""
        for sj in self.jobs.values():
            sj.notify()
        await asyncio.sleep(0)
