"""The review page: static HTML, CSS and JS (package data in static/, no build step, nothing from elsewhere) that
watches jobs and reviews their takes through the job API and its event stream, like any client.

    GET /             the jobs: progress from each running job's events, counts, frames/s, ETA, cancel
    GET /jobs/{id}    one job: its segments, filters, a player per take, take verdicts and history, retake and
                      accept, GPU memory and utilisation over the job (its `gpu` events)
    GET /static/...   the files

These routes need no key (guards.py: they hold no data); the page asks for the key when the API answers 401, keeps
it in the tab's sessionStorage and sends it as `Authorization: Bearer` with every request it makes. Audio comes
through fetch too (a blob per take), since an <audio src> cannot send that header.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
NO_CACHE = {"Cache-Control": "no-cache"}  # a new fishmp's page is seen at the next load (revalidated by ETag)


def _page(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def page(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, name), media_type="text/html; charset=utf-8", headers=NO_CACHE)

    return page


ROUTES = [
    Route("/", _page("jobs.html"), methods=["GET"]),
    Route("/jobs/{job_id}", _page("job.html"), methods=["GET"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]
