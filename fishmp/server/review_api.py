"""The job API's review routes (retakes.py does the work):

    POST /v1/jobs/{id}/segments/{segment_id}/retake     202 {"id", "segment", "status": "retaking", "seed", "take"}
    POST /v1/jobs/{id}/segments/{segment_id}/accept     200 the segment's take: {"suspect": false, "review", ...}
    GET  /v1/jobs/{id}/segments/{segment_id}/takes/{n}  take n's wav (1 = the first written; the last is the current)

Both POSTs take an optional JSON body `{"by": "<reviewer>"}`, recorded with the decision. Errors: 404 unknown job or
segment; 409 a retake of a pending segment or of one whose retake is running, an accept of a segment that is not
suspect (or not done, or retaking); 400 a body that is not `{"by": string}`; 429 / 503 as for any job.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .bodies import JSON, read_object
from .errors import ApiError
from .jobs_api import inside
from .jobstore import StoredJob
from .retakes import Review
from .state import ServerState

MAX_BY_CHARS = 100


def _target(request: Request) -> tuple[Review, StoredJob, str]:
    state: ServerState = request.app.state.server
    return state.review, state.jobs.get(request.path_params["job_id"]), request.path_params["segment_id"]


async def _by(request: Request) -> str | None:
    """The reviewer's name from an optional `{"by": ...}` body."""
    if not (await request.body()).strip():
        return None
    body: Any = await read_object(request, (JSON,))
    if not isinstance(body, dict) or set(body) - {"by"}:
        raise ApiError(400, "invalid body", 'an optional JSON object {"by": "<who reviews>"} and nothing else')
    by = body.get("by")
    if by is not None and (not isinstance(by, str) or len(by.strip()) > MAX_BY_CHARS):
        raise ApiError(400, "invalid body", f'"by" is a name of at most {MAX_BY_CHARS} characters')
    return (by.strip() or None) if by else None


async def retake(request: Request) -> Response:
    review, sj, sid = _target(request)
    by = await _by(request)
    return JSONResponse(await review.retake(sj, sid, by), status_code=202)


async def accept(request: Request) -> Response:
    review, sj, sid = _target(request)
    by = await _by(request)
    return JSONResponse({"id": sj.id, "segment": sid, **(await review.accept(sj, sid, by))})


async def take_audio(request: Request) -> Response:
    _, sj, sid = _target(request)
    seg = sj.view.segments.get(sid)
    if seg is None:
        raise ApiError(404, "unknown segment", f"job {sj.id} has no segment {sid!r}")
    history = seg.get("history") or []
    n = request.path_params["take"]
    written = len(history) + (1 if seg["status"] == "done" else 0)
    if not 1 <= n <= written:
        raise ApiError(404, "no such take", f"segment {sid!r} has {written} written take(s): 1 to {written}")
    path = os.path.join(sj.out, history[n - 1]["file"]) if n <= len(history) else seg["path"]
    return FileResponse(inside(sj, path), media_type="audio/wav", filename=f"{os.path.basename(sid)}.take{n}.wav")


# Before the job API's own `/segments/{segment_id:path}`, which would take ".../retake" as a segment id.
ROUTES = [
    Route("/v1/jobs/{job_id}/segments/{segment_id:path}/retake", retake, methods=["POST"]),
    Route("/v1/jobs/{job_id}/segments/{segment_id:path}/accept", accept, methods=["POST"]),
    Route("/v1/jobs/{job_id}/segments/{segment_id:path}/takes/{take:int}", take_audio, methods=["GET"]),
]
