"""Request bodies to Python objects, by content type: JSON, msgpack (ormsgpack, as fish's own client sends) and
forms (multipart/form-data, application/x-www-form-urlencoded; python-multipart). Anything else is a 415 naming
what is accepted. A form's file parts come back as bytes; its text fields as strings (a field given several times
as a list). A lone surrogate (`"\\ud800"`) or nesting too deep is a 400, like any malformed body."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from .errors import ApiError
from .guards import BodyTooLarge

INLINE_BYTES = 256 * 1024  # bodies up to this are parsed on the event loop (well under a millisecond)
JSON, MSGPACK, MULTIPART, URLENCODED = ("application/json", "application/msgpack", "multipart/form-data",
                                        "application/x-www-form-urlencoded")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def unsupported(request: Request, accepted: tuple[str, ...]) -> ApiError:
    given = content_type(request) or "none"
    return ApiError(415, "unsupported media type", f"Content-Type {given}; send one of {', '.join(accepted)}",
                    {"Accept": ", ".join(accepted)})


async def read_object(request: Request, accepted: tuple[str, ...] = (JSON, MSGPACK)) -> Any:
    """A JSON or msgpack body decoded (any JSON value; the caller checks its shape)."""
    kind = content_type(request)
    if kind not in accepted or kind not in (JSON, MSGPACK):
        raise unsupported(request, accepted)
    raw = await request.body()
    if len(raw) > INLINE_BYTES:  # a film's job: parsed beside the event loop, which keeps serving everyone else
        return await asyncio.to_thread(decode, raw, kind)
    return decode(raw, kind)


def decode(raw: bytes, kind: str) -> Any:
    """JSON or msgpack bytes to Python objects; ApiError 400 for anything a handler could not store or use."""
    what = "JSON" if kind == JSON else "msgpack"
    try:
        if kind == JSON:
            data = json.loads(raw)
            if b"\\ud" in raw.lower():  # an escaped surrogate: a lone one is no character (it cannot be stored)
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            return data
        import ormsgpack

        return ormsgpack.unpackb(raw)
    except RecursionError:
        raise ApiError(400, f"invalid {what}", "nested too deeply") from None
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
        raise ApiError(400, f"invalid {what}", f"a string holds {bad}, half of a surrogate pair (not a character): "
                       "send the text as UTF-8") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, ormsgpack.MsgpackDecodeError, UnicodeDecodeError
        raise ApiError(400, f"invalid {what}", str(exc)[:300]) from None


async def read_form(request: Request, max_part_bytes: int) -> dict[str, Any]:
    """A form as {name: value or [values]}; file parts as bytes."""
    try:
        form = await request.form(max_part_size=max_part_bytes)
    except BodyTooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors (and Starlette's limits)
        raise ApiError(400, "invalid form", f"{type(exc).__name__}: {exc}") from None
    out: dict[str, Any] = {}
    for key in form:
        values = [await v.read() if isinstance(v, UploadFile) else v for v in form.getlist(key)]
        out[key] = values[0] if len(values) == 1 else values
    await form.close()
    return out


async def read_fields(request: Request, max_part_bytes: int) -> tuple[str, Any]:
    """(content type, decoded body) for the routes that take JSON, msgpack or a form."""
    kind = content_type(request)
    if kind in (MULTIPART, URLENCODED):
        return kind, await read_form(request, max_part_bytes)
    return kind, await read_object(request, (JSON, MSGPACK, MULTIPART))


def as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
