"""fish-speech main's reference routes, on the store of refstore.py (kept under the data dir):

    POST   /v1/references/add      multipart `id`, `audio` (a file), `text`        409 if the id exists
    GET    /v1/references/list     {"success", "reference_ids", "message"}
    DELETE /v1/references/delete   JSON or form `reference_id`                     404 if unknown
    POST   /v1/references/update   JSON or form `old_reference_id`, `new_reference_id`

Answers have upstream's shapes ({"success": true, "message", "reference_id"}); errors are fishmp's JSON errors.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .bodies import read_fields
from .errors import ApiError
from .refstore import ReferenceExists, check_id
from .state import ServerState


async def _fields(request: Request) -> tuple[ServerState, dict[str, Any]]:
    state: ServerState = request.app.state.server
    _, body = await read_fields(request, int(state.serve.max_body_mb * 2**20))
    if not isinstance(body, dict):
        raise ApiError(400, "invalid request", "the body must be an object (JSON, msgpack or a form)")
    return state, body


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{key} missing", f"give {key}")
    return value.strip()


def _valid_id(value: str, key: str) -> str:
    try:
        return check_id(value, key)
    except ValueError as exc:
        raise ApiError(400, f"invalid {key}", str(exc)) from None


async def add(request: Request) -> Response:
    state, body = await _fields(request)
    ref_id = _valid_id(_text(body, "id"), "id")
    audio = body.get("audio")
    if not isinstance(audio, bytes) or not audio:
        raise ApiError(400, "audio missing", "give audio as a file part of a multipart/form-data body")
    text = _text(body, "text")
    try:
        await asyncio.to_thread(state.refs.add, ref_id, audio, text)
    except ReferenceExists as exc:
        raise ApiError(409, "reference exists", str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "reference audio cannot be used", str(exc)) from None
    return JSONResponse({"success": True, "message": f"Reference voice '{ref_id}' added successfully",
                         "reference_id": ref_id})


async def listing(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"success": True, "reference_ids": state.refs.list(), "message": "Success"})


async def delete(request: Request) -> Response:
    state, body = await _fields(request)
    ref_id = _valid_id(_text(body, "reference_id"), "reference_id")
    try:
        state.refs.delete(ref_id)
    except LookupError as exc:
        raise ApiError(404, "unknown reference_id", str(exc)) from None
    return JSONResponse({"success": True, "message": f"Reference voice '{ref_id}' deleted", "reference_id": ref_id})


async def update(request: Request) -> Response:
    state, body = await _fields(request)
    old = _valid_id(_text(body, "old_reference_id"), "old_reference_id")
    new = _valid_id(_text(body, "new_reference_id"), "new_reference_id")
    try:
        state.refs.rename(old, new)
    except LookupError as exc:
        raise ApiError(404, "unknown reference_id", str(exc)) from None
    except ReferenceExists as exc:
        raise ApiError(409, "reference exists", str(exc)) from None
    return JSONResponse({"success": True, "message": f"Reference voice '{old}' renamed to '{new}'",
                         "old_reference_id": old, "new_reference_id": new})


ROUTES = [
    Route("/v1/references/add", add, methods=["POST"]),
    Route("/v1/references/list", listing, methods=["GET"]),
    Route("/v1/references/delete", delete, methods=["DELETE", "POST"]),
    Route("/v1/references/update", update, methods=["POST"]),
]
