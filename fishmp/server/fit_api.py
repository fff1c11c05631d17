"""The fit over HTTP (docs/dubbing.md):

    GET /v1/jobs/{id}/track                    the film's track of a job whose segments carry `start`
                                               (fishmp/running/track.py writes it when the job finishes): track.wav,
                                               or with ?format=srt the SRT of the dub's timings; 404 naming why when
                                               there is none (no segment has a start, or the job has not finished)
    GET /v1/jobs/{id}/segments/{sid}/raw       a fitted segment's raw take (before trim, stretch and loudness);
                                               404 when the segment is not fitted or not written
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from ..running.track import TRACK, TRACK_SRT
from .errors import ApiError
from .state import ServerState

FILES = {"wav": (TRACK, "audio/wav"), "srt": (TRACK_SRT, "application/x-subrip")}


def track_files(out: str) -> list[str]:
    """The track's files present in a job's output directory (for its archive)."""
    return [name for name, _ in FILES.values() if os.path.isfile(os.path.join(out, name))]


async def track(request: Request) -> Response:
    state: ServerState = request.app.state.server
    sj = state.jobs.get(request.path_params["job_id"])
    fmt = request.query_params.get("format", "wav")
    if fmt not in FILES:
        raise ApiError(400, "invalid format", f"format {fmt!r}: the track comes as wav or srt")
    name, media = FILES[fmt]
    path = os.path.join(sj.out, name)
    if not os.path.isfile(path):
        why = "it has not finished" if not sj.view.over else "none of its segments has a start (seconds in the video)"
        raise ApiError(404, "no track", f"job {sj.id} has no track: {why}")
    return FileResponse(path, media_type=media, filename=f"{sj.id}.{name}")


async def raw(request: Request) -> Response:
    state: ServerState = request.app.state.server
    sj = state.jobs.get(request.path_params["job_id"])
    sid = request.path_params["segment_id"]
    seg = sj.view.segments.get(sid)
    if seg is None:
        raise ApiError(404, "unknown segment", f"job {sj.id} has no segment {sid!r}")
    path = (seg.get("fit") or {}).get("raw")
    real, out = (os.path.realpath(path), os.path.realpath(sj.out)) if path else ("", "")
    if not path or os.path.commonpath([real, out]) != out or not os.path.isfile(real):
        raise ApiError(404, "no raw take", f"segment {sid!r} has no raw take: it is not fitted, or not written yet")
    return FileResponse(real, media_type="audio/wav", filename=os.path.basename(real))


# Before the job API's segment route, whose `{segment_id:path}` would take the raw take's path.
ROUTES = [Route("/v1/jobs/{job_id}/track", track, methods=["GET"]),
          Route("/v1/jobs/{job_id}/segments/{segment_id:path}/raw", raw, methods=["GET"])]
