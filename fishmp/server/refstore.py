"""The reference store under the server's data directory: stored voices by name, and every reference audio a request
brings, kept once by content. No HTTP here (the CLI reads the same store for a job's `reference_id`).

    <data dir>/voices/<sha256 of the bytes>.<wav|flac|ogg|mp3>   each reference audio, validated once, never changed
    <data dir>/references/<id>.json                             {"id", "audio": <file in voices/>, "text", "created_at"}

A stored voice names a file in voices/, so deleting or renaming a voice never breaks a job that already uses its
audio, and a voice sent with every request (pyvideotrans does) is one file: the same path, the same speaker id
(`Voice.speaker_id`, derived from the content) and so one encoding per worker (the reference cache keys by
content) and one batch session for concurrent requests of that voice. A reference id is a name
(`fishmp.job.model.REFERENCE_ID`), never a path.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

from ..engines.audio import MAX_REFERENCE_S, read_reference
from ..engines.base import BadReferenceError
from ..job.model import REFERENCE_ID
from ..worker.files import atomic_write_bytes, new_temp

log = logging.getLogger("fishmp")
_EXTENSIONS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "AIFF": "aiff"}
_KNOWN_EXTENSIONS = tuple(sorted(set(_EXTENSIONS.values())))
REFUSED_KEPT = 256  # verdicts on refused audio remembered (a client retrying a bad reference is not decoded again)


class ReferenceExists(Exception):
    """A stored voice of that id exists already (409)."""


@dataclass(frozen=True)
class Voice:
    path: str  # absolute, in voices/
    text: str  # the reference transcript
    reference_id: str | None = None  # the stored voice it came from

    @property
    def speaker_id(self) -> str:
        """The same audio and transcript give the same id, so equal voices of concurrent requests share one encoded
        reference and one prefilled prefix per worker."""
        digest = hashlib.sha256(os.path.basename(self.path).encode() + b"\0" + self.text.encode()).hexdigest()
        return f"v{digest[:20]}"


def check_id(reference_id: object, what: str = "reference_id") -> str:
    if not isinstance(reference_id, str) or not REFERENCE_ID.match(reference_id):
        raise ValueError(f"{what} must be a name of 1 to 64 letters, digits, '_' or '-', not {reference_id!r}")
    return reference_id


def decode_audio_string(value: str, what: str) -> bytes:
    """Audio bytes from base64 text or a `data:audio/...;base64,...` URL; ValueError naming `what` otherwise."""
    payload = value.strip()
    if payload.startswith("data:"):
        head, sep, payload = payload.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ValueError(f"{what} is a data URL without ';base64,' (give data:audio/wav;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64 audio (nor a data:audio/...;base64 URL)") from None
    if not data:
        raise ValueError(f"{what} is empty")
    return data


class References:
    """The store. Safe for concurrent requests: files appear atomically, names are claimed with a hard link, and the
    same bytes arriving in several requests at once are checked by one of them while the others wait for its
    verdict (a refused audio's verdict is remembered too): never decoded twice."""

    def __init__(self, data_dir: str, max_reference_s: float = MAX_REFERENCE_S) -> None:
        self.voices_dir = os.path.join(os.path.abspath(data_dir), "voices")
        self.refs_dir = os.path.join(os.path.abspath(data_dir), "references")
        self.max_reference_s = max_reference_s
        self._guard = threading.Lock()
        self._pending: dict[str, threading.Lock] = {}  # digest -> held while its bytes are checked
        self._refused: collections.OrderedDict[str, str] = collections.OrderedDict()  # digest -> why (the last few)

    # -- audio, by content ---------------------------------------------------------------------------------------
    def store_audio(self, data: bytes, what: str) -> str:
        """The path of these audio bytes in voices/, validated (header first: channels, rate, length; then decodable,
        long enough, not silent) the first time. ValueError naming `what` when the audio cannot be a reference.
        Blocking (hashing, decoding): call it off the event loop."""
        if not data:
            raise ValueError(f"{what} is empty")
        digest = hashlib.sha256(data).hexdigest()
        with self._guard:
            lock = self._pending.setdefault(digest, threading.Lock())
        with lock:  # a second request with these bytes waits here for the first one's verdict
            try:
                return self._store(data, digest, what)
            finally:
                with self._guard:
                    self._pending.pop(digest, None)

    def _known(self, digest: str) -> str | None:
        for ext in _KNOWN_EXTENSIONS:
            known = os.path.join(self.voices_dir, f"{digest}.{ext}")
            if os.path.isfile(known):
                return known
        return None

    def _store(self, data: bytes, digest: str, what: str) -> str:
        if (known := self._known(digest)) is not None:
            with contextlib.suppress(OSError):
                os.utime(known)  # in use again: the sweep (sweep.py) spares recently used voices
            return known
        if digest in self._refused:
            raise ValueError(self._refused[digest].replace("\0what\0", what))
        os.makedirs(self.voices_dir, exist_ok=True)
        tmp = new_temp(self.voices_dir)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            t0 = time.monotonic()
            try:
                read_reference(tmp, self.max_reference_s)  # header first, then the engines' own checks
                import soundfile as sf

                ext = _EXTENSIONS.get(sf.info(tmp).format, "wav")
            except BadReferenceError as exc:
                why = str(exc).replace(f"audio {tmp}", "\0what\0").replace(tmp, "\0what\0")
                log.info("[Serve] reference audio %s (%d bytes) refused: %s", digest[:16], len(data),
                         why.replace("\0what\0", "it"))
                self._refused[digest] = why
                while len(self._refused) > REFUSED_KEPT:
                    self._refused.popitem(last=False)
                raise ValueError(why.replace("\0what\0", what)) from None
            final = os.path.join(self.voices_dir, f"{digest}.{ext}")
            os.replace(tmp, final)
            log.info("[Serve] reference audio %s (%d bytes) checked and stored in %.2fs", digest[:16], len(data),
                     time.monotonic() - t0)
            return final
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def data_url(self, url: str) -> str:
        """fishmp.job.model.VoiceSource: a job speaker's data-URL reference_audio, stored."""
        return self.store_audio(decode_audio_string(url, "the data URL"), "the data URL's audio")

    # -- stored voices ---------------------------------------------------------------------------------------------
    def _entry(self, reference_id: str) -> str:
        return os.path.join(self.refs_dir, f"{check_id(reference_id)}.json")

    def get(self, reference_id: str) -> Voice:
        """LookupError (one line) when there is no such voice."""
        path = self._entry(reference_id)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
            audio = os.path.join(self.voices_dir, os.path.basename(meta["audio"]))
            if not os.path.isfile(audio):
                raise FileNotFoundError(audio)
            return Voice(audio, str(meta["text"]), reference_id)
        except FileNotFoundError:
            raise LookupError(f'reference_id "{reference_id}" is not a stored voice (POST /v1/references/add '
                              "stores one; GET /v1/references/list lists them)") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise LookupError(f'reference_id "{reference_id}": its entry {path} cannot be read') from None

    def reference(self, reference_id: str) -> tuple[str, str]:
        """fishmp.job.model.VoiceSource: a job speaker's reference_id."""
        voice = self.get(reference_id)
        return voice.path, voice.text

    def add(self, reference_id: str, audio: bytes, text: str) -> Voice:
        """Store a voice; ReferenceExists if the id is taken, ValueError for a bad id, audio or text."""
        check_id(reference_id, "id")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text (the transcript of the reference audio) is empty")
        path = self.store_audio(audio, "audio")
        os.makedirs(self.refs_dir, exist_ok=True)
        meta = {"id": reference_id, "audio": os.path.basename(path), "text": text.strip(), "created_at": time.time()}
        tmp = new_temp(self.refs_dir, ".json")
        try:
            atomic_write_bytes(tmp, json.dumps(meta, ensure_ascii=False).encode())
            try:
                os.link(tmp, self._entry(reference_id))  # fails if the name exists: no two adds win
            except FileExistsError:
                raise ReferenceExists(f'reference "{reference_id}" exists already (delete it first, or use '
                                      "another id)") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return Voice(path, meta["text"], reference_id)

    def list(self) -> list[str]:
        try:
            names = os.listdir(self.refs_dir)
        except FileNotFoundError:
            return []
        ids = sorted(n[:-5] for n in names if n.endswith(".json") and REFERENCE_ID.match(n[:-5]))
        return [i for i in ids if self._usable(i)]

    def _usable(self, reference_id: str) -> bool:
        """Its entry reads and its audio is there (a voice whose file was removed by hand is not offered)."""
        try:
            self.get(reference_id)
        except LookupError:
            return False
        return True

    def delete(self, reference_id: str) -> None:
        try:
            os.unlink(self._entry(reference_id))
        except FileNotFoundError:
            raise LookupError(f'reference_id "{reference_id}" is not a stored voice') from None

    def rename(self, old: str, new: str) -> None:
        """LookupError if `old` is unknown, ReferenceExists if `new` is taken."""
        check_id(old, "old_reference_id")
        check_id(new, "new_reference_id")
        voice = self.get(old)
        if old == new:
            return  # already so named
        meta = {"id": new, "audio": os.path.basename(voice.path), "text": voice.text, "created_at": time.time()}
        tmp = new_temp(self.refs_dir, ".json")
        try:
            atomic_write_bytes(tmp, json.dumps(meta, ensure_ascii=False).encode())
            try:
                os.link(tmp, self._entry(new))
            except FileExistsError:
                raise ReferenceExists(f'reference "{new}" exists already') from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.delete(old)
