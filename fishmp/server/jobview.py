"""What the job API says about a job, folded from its events alone (pure: no files, no HTTP), so a restarted server
rebuilds the same view by replaying the event log.

Status: `queued` (accepted, not started), `running` (its `plan` event came), then from its `finished` event:
`done` (every segment done), `failed` (some failed or could not start), `cancelled` (DELETE), `interrupted` (the
server stopped; a restarted server resumes it and it is `queued` again). Each segment: id, speaker, text, status
(pending, done, failed), and once known path, audio/synthesis seconds, tokens, worker, attempts, the take check's
suspect, takes, kept_take and seed, or error and its kind.

Review (retakes.py) adds its own events to the log: `retake_started` (the segment's `retake` is running),
`segment_retaken` (the new take's fields and its `history` of replaced takes), `retake_failed` (the old take stays;
`retake` says why), `segment_accepted` (`suspect` cleared, `review` the decision).
"""

from __future__ import annotations

from typing import Any

TERMINAL = ("done", "failed", "cancelled", "damaged")  # damaged: its files could not be read at start (jobstore.py)
DONE_FIELDS = ("path", "audio_seconds", "synthesis_seconds", "tokens", "worker", "device", "attempts", "suspect",
               "takes", "kept_take", "seed", "over_slot_s", "fit")
TAKE_FIELDS = (*DONE_FIELDS[1:], "history", "review")  # what a retake replaces (the path stays the segment's)


class JobView:
    def __init__(self, job_id: str, created_at: float, segments: list[dict[str, Any]]) -> None:
        self.id, self.created_at = job_id, created_at
        self.status = "queued"
        self.exit_code: int | None = None
        self.error: str | None = None
        self.segments: dict[str, dict[str, Any]] = {
            s["id"]: {"id": s["id"], "speaker": s["speaker"], "text": s["text"], "status": "pending"} for s in segments}

    def apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        seg = self.segments.get(ev["id"]) if isinstance(ev.get("id"), str) else None
        if kind == "plan":
            self.status, self.exit_code, self.error = "running", None, None
        elif kind == "segment_done" and seg is not None:
            seg.update(status="done", error=None, error_kind=None)
            seg.update({k: ev[k] for k in DONE_FIELDS if ev.get(k) is not None})
        elif kind == "segment_failed" and seg is not None:
            seg.update(status="failed", error=ev.get("error"), error_kind=ev.get("kind"), attempts=ev.get("attempts"))
        elif kind == "segment_requeued" and seg is not None:
            seg.update(status="pending", attempts=ev.get("attempts"))
        elif kind == "retake_started" and seg is not None:
            seg["retake"] = {"status": "running", "seed": ev.get("seed"), "take": ev.get("take"), "at": ev.get("time")}
        elif kind == "segment_retaken" and seg is not None:
            seg.update(status="done", error=None, error_kind=None, retake=None)
            seg.update({k: ev.get(k) for k in TAKE_FIELDS})
        elif kind == "retake_failed" and seg is not None:
            seg["retake"] = {"status": "failed", "seed": ev.get("seed"), "error": ev.get("error"), "at": ev.get("time")}
        elif kind == "segment_accepted" and seg is not None:
            seg.update(suspect=False, review=ev.get("review"))
        elif kind == "finished":  # fishmp serve adds `error` to one of its own when the job could not start
            self.exit_code, self.error = ev.get("exit_code"), ev.get("error")
            if ev.get("cancelled"):
                self.status = "cancelled"
            elif ev.get("interrupted"):
                self.status = "interrupted"
            else:
                self.status = "failed" if ev.get("failed") or ev.get("pending") or self.error else "done"

    def resumed(self) -> None:
        """A restarted server runs it again."""
        self.status = "queued"

    @property
    def over(self) -> bool:
        return self.status in TERMINAL or self.status == "interrupted"

    @property
    def retaking(self) -> list[str]:
        """Segments whose retake is running."""
        return [sid for sid, s in self.segments.items() if (s.get("retake") or {}).get("status") == "running"]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "pending": 0, "suspect": 0}
        for seg in self.segments.values():
            out[seg["status"]] += 1
            out["suspect"] += int(seg["status"] == "done" and bool(seg.get("suspect")))
        return out

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "counts": self.counts(), "created_at": self.created_at}

    def detail(self) -> dict[str, Any]:
        segments = [{k: v for k, v in s.items() if v is not None and k != "path"} for s in self.segments.values()]
        return {**self.summary(), "exit_code": self.exit_code, "error": self.error, "segments": segments}
