"""The job API: fishmp's job JSON over HTTP (no Fish server has this).

    POST   /v1/jobs                                 202 {"id", "status", "segments": [{"id", "speaker", "text", "status"}]}
    GET    /v1/jobs                                 {"jobs": [{"id", "status", "counts", "created_at"}, ...]}
    GET    /v1/jobs/{id}                            + "exit_code", "error", "segments" (per segment: status, speaker,
                                                    text, audio/synthesis seconds, tokens, attempts, takes, suspect...)
    GET    /v1/jobs/{id}/events                     server-sent events: `id: N`, `event: <kind>`, `data: <event JSON>`
    GET    /v1/jobs/{id}/segments/{segment_id}      the segment's wav (409 until it is done)
    GET    /v1/jobs/{id}/manifest                   manifest.json
    GET    /v1/jobs/{id}/archive                    a zip of the wavs done so far and manifest.json (and the track)
    GET    /v1/jobs/{id}/track                      the film's track.wav (?format=srt: track.srt), server/fit_api.py
    GET    /v1/jobs/{id}/segments/{sid}/raw         a fitted segment's raw take (server/fit_api.py)
    DELETE /v1/jobs/{id}                            cancel: running segments get FISH_SHUTDOWN_GRACE_S

The event stream starts at the job's first event (a late reader misses nothing), or after `Last-Event-ID` (the
header, or `?last_event_id=`), and ends after the job's last `finished`; a comment line keeps idle streams open.
"""

from __future__ import annotations

import asyncio
import json
import os
import zipfile
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..worker.files import new_temp
from . import fit_api
from .bodies import JSON, read_object
from .errors import ApiError, scrub
from .jobstore import JobStore, StoredJob, json_text
from .state import ServerState

KEEPALIVE_S = 15.0


def _store(request: Request) -> JobStore:
    state: ServerState = request.app.state.server
    return state.jobs


def _job(request: Request) -> StoredJob:
    return _store(request).get(request.path_params["job_id"])


async def create(request: Request) -> Response:
    state: ServerState = request.app.state.server
    state.check_accepting()
    body = await read_object(request, (JSON,))
    sj = await state.jobs.create(body)
    segments = [{k: s[k] for k in ("id", "speaker", "text", "status")} for s in sj.view.segments.values()]
    return JSONResponse({"id": sj.id, "status": sj.view.status, "segments": segments}, status_code=202,
                        headers={"Location": f"/v1/jobs/{sj.id}"})


async def listing(request: Request) -> Response:
    return JSONResponse({"jobs": [sj.view.summary() for sj in _store(request).jobs.values()]})


async def detail(request: Request) -> Response:
    view = _job(request).view.detail()
    state: ServerState = request.app.state.server
    view["error"] = scrub(view["error"], state)
    for seg in view["segments"]:
        if "error" in seg:
            seg["error"] = scrub(seg["error"], state)
    return JSONResponse(view)


async def cancel(request: Request) -> Response:
    sj = _store(request).cancel(request.path_params["job_id"])
    return JSONResponse({"id": sj.id, "status": "cancelling"}, status_code=202)


def _sse(index: int, ev: dict, state: ServerState) -> bytes:
    data = scrub(json_text(ev), state)  # a worker's error names files under the data dir: not for clients
    return f"id: {index}\nevent: {ev.get('event', 'message')}\ndata: {data}\n\n".encode()


async def events(request: Request) -> Response:
    sj = _job(request)
    state: ServerState = request.app.state.server
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    try:
        start = int(last) + 1 if last is not None else 0
    except ValueError:
        raise ApiError(400, "invalid Last-Event-ID", f"{last!r} is not an event id (a whole number)") from None

    async def stream() -> Any:
        index = max(0, start)
        while True:
            waiter = sj.waiter()
            while index < len(sj.events):
                yield _sse(index, sj.events[index], state)
                if sj.final_at(index):
                    return
                index += 1
            if sj.view.over and (state.stopping or (index >= len(sj.events) and not sj.view.retaking)):
                return  # going down, or resumed past the end of a job that is over: no event will come
            try:
                await asyncio.wait_for(waiter.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def inside(sj: StoredJob, path: str) -> str:
    real, out = os.path.realpath(path), os.path.realpath(sj.out)
    if os.path.commonpath([real, out]) != out or not os.path.isfile(real):
        raise ApiError(404, "no such file", "the segment's wav is not in the job's output directory")
    return real


async def segment(request: Request) -> Response:
    sj = _job(request)
    seg_id = request.path_params["segment_id"]
    seg = sj.view.segments.get(seg_id)
    if seg is None:
        raise ApiError(404, "unknown segment", f"job {sj.id} has no segment {seg_id!r}")
    if seg["status"] != "done" or not seg.get("path"):
        raise ApiError(409, "segment not done", f"segment {seg_id!r} is {seg['status']}"
                       + (f": {seg.get('error')}" if seg.get("error") else ""))
    return FileResponse(inside(sj, seg["path"]), media_type="audio/wav", filename=os.path.basename(seg["path"]))


async def manifest(request: Request) -> Response:
    sj = _job(request)
    path = os.path.join(sj.out, "manifest.json")
    if not os.path.isfile(path):
        raise ApiError(404, "no manifest yet", f"job {sj.id} has not written its manifest yet")
    if not await asyncio.to_thread(_is_json_object, path):
        raise ApiError(409, "manifest damaged", f"job {sj.id}'s manifest.json is not a JSON object (edited or cut "
                       "short on disk)")
    return FileResponse(path, media_type="application/json")


def _is_json_object(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def _zip(sj: StoredJob) -> str:
    """A zip of the done segments' wavs (their paths inside the output directory) and manifest.json."""
    os.makedirs(sj.dir, exist_ok=True)
    tmp = new_temp(sj.dir, ".zip")
    out = os.path.realpath(sj.out)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:  # wavs do not compress
        for seg in sj.view.segments.values():
            path = seg.get("path")
            if seg["status"] == "done" and path and os.path.isfile(path):
                z.write(path, os.path.relpath(os.path.realpath(path), out))
        if os.path.isfile(os.path.join(out, "manifest.json")):
            z.write(os.path.join(out, "manifest.json"), "manifest.json")
        for name in fit_api.track_files(out):  # the film's track, when the job places its lines
            z.write(os.path.join(out, name), name)
    return tmp


async def archive(request: Request) -> Response:
    sj = _job(request)
    path = await asyncio.to_thread(_zip, sj)
    return FileResponse(path, media_type="application/zip", filename=f"{sj.id}.zip",
                        background=BackgroundTask(os.unlink, path))


ROUTES = [
    Route("/v1/jobs", create, methods=["POST"]),
    Route("/v1/jobs", listing, methods=["GET"]),
    Route("/v1/jobs/{job_id}", detail, methods=["GET"]),
    Route("/v1/jobs/{job_id}", cancel, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/events", events, methods=["GET"]),
    Route("/v1/jobs/{job_id}/manifest", manifest, methods=["GET"]),
    Route("/v1/jobs/{job_id}/archive", archive, methods=["GET"]),
    *fit_api.ROUTES,  # the track, a fitted segment's raw take: before the segment route, which would take them
    Route("/v1/jobs/{job_id}/segments/{segment_id:path}", segment, methods=["GET"]),
]
