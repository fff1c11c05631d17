"""The Fish Audio SDK's voice list, `GET /model` (`voices.list()`) and `GET /model/{id}` (`voices.get()`), over the
stored voices (refstore.py, POST /v1/references/add).

Answer shape: what the SDK's `PaginatedResponse[Voice]` reads, `{"total", "items": [voice]}`, each voice with the
fields the SDK requires (`_id`, `type` "tts", `title` = the id, `description` = its transcript, `state` "trained",
`visibility` "private", counts 0, an `author` "fishmp"...). Query: `page_size` (1-100, default 10), `page_number`
(from 1), `title` (a case-insensitive substring of the id); the SDK's other filters (tags, language, author, sort)
are accepted and do not apply here.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .state import ServerState


def _int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApiError(400, f"invalid {key}", f"{key} must be a whole number from {lo} to {hi}, not {raw!r}")
    return value


def _voice(state: ServerState, reference_id: str) -> dict[str, Any] | None:
    try:
        voice = state.refs.get(reference_id)
    except (LookupError, ValueError):
        return None
    try:
        when = datetime.datetime.fromtimestamp(os.path.getmtime(voice.path), datetime.timezone.utc).isoformat()
    except OSError:
        when = datetime.datetime.fromtimestamp(0, datetime.timezone.utc).isoformat()
    return {"_id": reference_id, "type": "tts", "title": reference_id, "description": voice.text, "cover_image": "",
            "train_mode": "fast", "state": "trained", "tags": [], "samples": [], "created_at": when,
            "updated_at": when, "languages": [], "visibility": "private", "lock_visibility": False, "like_count": 0,
            "mark_count": 0, "shared_count": 0, "task_count": 0, "liked": False, "marked": False,
            "author": {"_id": "fishmp", "nickname": "fishmp", "avatar": ""}}


def _page(state: ServerState, title: str | None, size: int, number: int) -> dict[str, Any]:
    ids = state.refs.list()
    if title:
        ids = [i for i in ids if title.lower() in i.lower()]
    items = [v for v in (_voice(state, i) for i in ids[(number - 1) * size: number * size]) if v is not None]
    return {"total": len(ids), "items": items}


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    size = _int(request, "page_size", 10, 1, 100)
    number = _int(request, "page_number", 1, 1, 10**6)
    title = request.query_params.get("title")
    return JSONResponse(await asyncio.to_thread(_page, state, title, size, number))


async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    reference_id = request.path_params["model_id"]
    voice = await asyncio.to_thread(_voice, state, reference_id)
    if voice is None:
        raise ApiError(404, "unknown voice", f'"{reference_id[:100]}" is not a stored voice (GET /model lists them)')
    return JSONResponse(voice)


ROUTES = [Route("/model", list_models, methods=["GET"]), Route("/model/{model_id}", get_model, methods=["GET"])]
