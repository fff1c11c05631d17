"""Field checks shared by the three formats. Each check records what is wrong in a `Problems` list (naming the item
and what is allowed) and returns None instead of raising, so one pass over a file finds every problem; `JobError`
raises them all at once.

The output guarantee lives in `Outputs.resolve`: every accepted output path is absolute, ends in the required suffix
and resolves (symlinks included, via ``os.path.realpath``) to a file strictly inside the output directory.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import numpy as np

MAX_SECONDS_LIMIT = 3600.0  # a subtitle slot (max_seconds) longer than an hour is a mistake
_MAX_NAME_BYTES = 255  # one path component, as most filesystems allow
_CURRENT: Any = object()
# fishmp's own temp files (fishmp/worker/files.py TMP_PREFIX): a job's clean-up deletes files named so.
TEMP_PREFIX = ".fishmp-tmp-"
# Names Windows reserves for devices, with or without an extension (CON, aux.wav, nul.tar.wav); dubbing apps copy
# outputs to Windows and macOS machines, where such a file cannot be made.
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$",
                              *(f"{dev}{n}" for dev in ("COM", "LPT") for n in (*"123456789", "¹", "²", "³"))})
WINDOWS_FORBIDDEN = '<>:"|?*'


class Problems(list):
    """Problems found, in order. Each is tagged with the item it makes unusable (`item` at the time it was added;
    None for the whole file), so a caller that skips invalid items knows which ones to leave out."""

    def __init__(self) -> None:
        super().__init__()
        self.item: Hashable | None = None
        self.tags: list[Hashable | None] = []

    def add(self, message: str, item: Hashable | None = _CURRENT) -> None:
        self.append(message)
        self.tags.append(self.item if item is _CURRENT else item)


# --------------------------------------------------------------------------------------------------- text


_SPACE_CONTROLS = {"\t", "\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029"}


def normalize_text(text: str) -> str:
    """NFC; tabs and line breaks become spaces; other control characters (and lone surrogates) are removed;
    surrounding whitespace is stripped. Mixed scripts are left alone, and so are format characters (a zero-width
    joiner shapes Persian and emoji)."""
    text = unicodedata.normalize("NFC", text)
    out = []
    for ch in text:
        if ch in _SPACE_CONTROLS:
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch == "\ufeff":
            continue
        else:
            out.append(ch)
    return "".join(out).strip()


def _speakable(text: str) -> bool:
    """False when nothing but whitespace and invisible format characters (zero-width space, joiners...) is left."""
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


def bad_name_chars(name: str) -> list[str]:
    """Characters a file name or id must not hold: control (Cc), invisible format (Cf: bidi overrides such as U+202E,
    zero-width characters), line/paragraph separators and lone surrogates: each makes a name print as something it
    is not."""
    return [ch for ch in dict.fromkeys(name) if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def _describe_bad(name: str) -> str:
    return f"contains invisible or control characters ({', '.join(repr(c) for c in bad_name_chars(name))})"


# --------------------------------------------------------------------------------------------------- values


def typename(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_id(x: Any) -> bool:
    return is_int(x) or (isinstance(x, str) and bool(x.strip()) and not bad_name_chars(x))


def check_duplicate_keys(obj: Any, where: str, p: Problems) -> None:
    for key in getattr(obj, "duplicates", ()):
        p.add(f"{where}: key {key!r} is given more than once")


def unknown_keys(obj: dict, allowed: set[str], where: str, p: Problems) -> None:
    for key in obj:
        if key not in allowed and not (isinstance(key, str) and key.startswith("_")):
            p.add(f"{where}: unknown key {key!r} (expected: {', '.join(sorted(allowed))})")


def objects(items: list, name: str, p: Problems) -> Iterator[tuple[int, str, dict]]:
    """(index, "name[i]", item) for the items that are JSON objects; the others are recorded as problems of their
    own item (index i). `p.item` is set to ("item", i) while the caller handles item i."""
    for i, raw in enumerate(items):
        p.item = ("item", i)
        where = f"{name}[{i}]"
        if not isinstance(raw, dict):
            p.add(f"{where}: must be an object, not {typename(raw)}")
            continue
        check_duplicate_keys(raw, where, p)
        yield i, where, raw
    p.item = None


def required_list(data: dict, key: str, where: str, what: str, p: Problems) -> list:
    """data[key] as a non-empty list, or [] with the problem recorded."""
    value = data.get(key)
    if value is None:
        p.add(f'{where}: missing "{key}" ({what})')
        return []
    if not isinstance(value, list):
        p.add(f'{where}: "{key}" must be a list, not {typename(value)}')
        return []
    if not value:
        p.add(f"{where}: no {key}: nothing to do")
    return value


def check_opt_path(obj: dict, key: str, where: str, p: Problems) -> None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        p.add(f'{where}: "{key}" must be a non-empty path, not {value!r}')
    elif isinstance(value, str) and bad_name_chars(value):
        p.add(f'{where}: "{key}" {value!r} {_describe_bad(value)}')


def check_output_dir(output_dir: Any, p: Problems) -> str:
    if not isinstance(output_dir, str) or not output_dir.strip():
        p.add(f"output directory must be a non-empty path, not {output_dir!r}")
        return os.path.abspath("fishmp-out")
    if bad_name_chars(output_dir):
        p.add(f"output directory {output_dir!r} {_describe_bad(output_dir)}")
    out = os.path.abspath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        p.add(f"output directory {out} exists and is not a directory")
    return out


def opt_dir(data: dict, key: str, base: str, p: Problems) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        p.add(f'config: "{key}" must be a non-empty path, not {value!r}')
        return None
    if bad_name_chars(value):
        p.add(f'config: "{key}" {value!r} {_describe_bad(value)}')
        return None
    return os.path.abspath(os.path.join(base, value))


# --------------------------------------------------------------------------------------------------- params


def max_seconds_field(obj: dict, where: str, p: Problems) -> float | None:
    """Optional per-segment `max_seconds` (a subtitle slot): a take longer than it fails the take check."""
    value = obj.get("max_seconds")
    if value is None:
        return None
    if not is_number(value) or not 0 < value <= MAX_SECONDS_LIMIT:
        p.add(f"{where}: max_seconds must be a number of seconds > 0 and <= {MAX_SECONDS_LIMIT:g}, not {value!r}")
        return None
    return float(value)


# --------------------------------------------------------------------------------------------------- references


def reference_file(obj: dict, key: str, base: str, where: str, p: Problems, *, required: bool,
                   npy: bool = False) -> str | None:
    """The absolute path of a reference file named by obj[key], checked to exist (and, for .npy, to hold a 2-D
    integer array); None (after reporting) when unusable."""
    if key not in obj or obj[key] is None:
        if required:
            p.add(f'{where}: missing "{key}"')
        return None
    raw = obj[key]
    if not isinstance(raw, str) or not raw.strip():
        p.add(f"{where}: {key} must be a non-empty path, not {raw!r}")
        return None
    if bad_name_chars(raw):
        p.add(f"{where}: {key} {raw!r} {_describe_bad(raw)}")
        return None
    path = os.path.abspath(os.path.join(base, raw))
    shown = raw if raw == path else f"{raw} ({path})"
    try:
        st = os.stat(path)
    except OSError as exc:
        p.add(f"{where}: {key} {shown} {_unreachable(path, exc)}")
        return None
    if not stat.S_ISREG(st.st_mode):
        p.add(f"{where}: {key} {shown} is not a file")
        return None
    if npy:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            ok = isinstance(arr, np.ndarray) and arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) \
                and arr.shape[1] > 0
            desc = f"shape {arr.shape}, dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report, not a crash
            p.add(f"{where}: {key} {shown} is not a readable .npy array ({type(e).__name__}: {e})")
            return None
        if not ok:
            p.add(f"{where}: {key} {shown} must hold prompt tokens, a 2-D integer array (codebooks, T); "
                  f"found {desc}")
            return None
    return path


def _unreachable(path: str, exc: OSError) -> str:
    """Why a path named in a job cannot be opened, in the words its author needs (a loop is not a missing file)."""
    if exc.errno == errno.ELOOP:
        return "is a symbolic link loop (following its links never reaches a file)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "does not exist"
    return f"cannot be read: {exc.strerror or exc}"


def text_field(obj: dict, key: str, where: str, p: Problems, what: str = "") -> str | None:
    """A normalised, speakable text from obj[key]; None (after reporting) when missing, not a string or empty."""
    raw = obj.get(key)
    if raw is None:
        p.add(f'{where}: missing "{key}"' + (f" ({what})" if what else ""))
        return None
    if not isinstance(raw, str):
        p.add(f"{where}: {key} must be a string, not {typename(raw)}")
        return None
    text = normalize_text(raw)
    if not _speakable(text):
        p.add(f"{where}: {key} is empty" + (" (only whitespace, control or zero-width characters)" if raw else ""))
        return None
    return text


def reference_text(obj: dict, where: str, p: Problems) -> str | None:
    return text_field(obj, "reference_text", where, p, "the transcript of the reference audio")


# --------------------------------------------------------------------------------------------------- outputs


def inside(path: str, directory: str) -> bool:
    try:
        return path != directory and os.path.commonpath([path, directory]) == directory
    except ValueError:
        return False


def portable_name_problem(name: str) -> str | None:
    """Why one path component cannot be an output on every system a dubbing app copies outputs to, or None: fishmp's
    temp-file prefix (its clean-up would delete the file), Windows device names, characters or endings Windows
    refuses."""
    if name.casefold().startswith(TEMP_PREFIX):
        return f"is named like fishmp's own temp files ({TEMP_PREFIX}...), which fishmp deletes: choose another name"
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        return ("is a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any extension): it "
                "cannot be created there")
    if bad := "".join(dict.fromkeys(c for c in name if c in WINDOWS_FORBIDDEN)):
        return f"contains characters Windows does not allow in file names ({' '.join(bad)})"
    if name.endswith((" ", ".")):
        return "ends in a space or a dot, which Windows drops (it would become another name)"
    return None


def _fold(path: str) -> str:
    """A path as a case-insensitive, normalisation-insensitive filesystem (Windows, macOS) compares it."""
    return unicodedata.normalize("NFC", path).casefold()


class Outputs:
    """Resolves output paths into the output directory and remembers them to find duplicates and collisions.
    Output names are NFC-normalised; two that differ only in letter case or Unicode form are one file on Windows and
    macOS, so they collide."""

    def __init__(self, out_dir: str, p: Problems) -> None:
        self.out = out_dir
        self.real = os.path.realpath(out_dir)
        self.p = p
        self.owner: dict[str, tuple[str, Hashable | None]] = {}  # resolved output -> (item that writes it, its tag)
        self.folded: dict[str, str] = {}  # _fold(output) -> that output

    def resolve(self, raw: Any, where: str, key: str, suffix: str, *, given: bool = True) -> str | None:
        p = self.p
        if raw is None:
            if given:
                p.add(f'{where}: missing "{key}"')
            return None
        if not isinstance(raw, str):
            p.add(f"{where}: {key} must be a path string, not {typename(raw)}")
            return None
        if not raw.strip():
            p.add(f"{where}: {key} is empty")
            return None
        if bad_name_chars(raw):
            p.add(f"{where}: {key} {raw!r} {_describe_bad(raw)}")
            return None
        if "\\" in raw:
            p.add(f"{where}: {key} {raw!r} contains a backslash; use / to separate directories")
            return None
        raw = unicodedata.normalize("NFC", raw)
        stem, ext = os.path.splitext(os.path.basename(raw))
        if ext.lower() != suffix or not stem:
            p.add(f"{where}: {key} {raw!r} must be a file name ending in {suffix}")
            return None
        candidate = raw if os.path.isabs(raw) else os.path.join(self.out, raw)
        real = os.path.realpath(candidate)
        if not inside(real, self.real):
            how = "resolves" if os.path.normpath(candidate) != real else "is"
            p.add(f"{where}: {key} {raw!r} {how} outside the output directory {self.out}"
                  + (f" (to {real})" if how == "resolves" else ""))
            return None
        rel = os.path.relpath(real, self.real)
        if any(len(c.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES for c in rel.split(os.sep)):
            p.add(f"{where}: {key} {raw!r} has a file or directory name longer than {_MAX_NAME_BYTES} bytes")
            return None
        for part in rel.split(os.sep):
            if problem := portable_name_problem(part):
                p.add(f"{where}: {key} {raw!r}: {part!r} {problem}")
                return None
        if os.path.isdir(real):
            p.add(f"{where}: {key} {raw!r} is an existing directory")
            return None
        output = os.path.join(self.out, rel)
        if output in self.owner:
            p.add(f"{where}: {key} {raw!r} is also the output of {self.owner[output][0]} ({output})")
            return None
        other = self.folded.get(_fold(output))
        if other is not None:
            p.add(f"{where}: {key} {raw!r} differs from the output of {self.owner[other][0]} ({other}) only in letter "
                  "case or Unicode form: on Windows and macOS they are one file")
            return None
        self.owner[output] = (where, p.item)
        self.folded[_fold(output)] = output
        return output

    def check_collisions(self, references: list[tuple[str, str, str | None]]) -> None:
        """Outputs that would overwrite a reference file, or that another output needs as a directory."""
        by_real = {os.path.realpath(o): o for o in self.owner}
        for who, key, path in references:
            if path and os.path.realpath(path) in by_real:
                out = by_real[os.path.realpath(path)]
                where, tag = self.owner[out]
                self.p.add(f"{where}: output {out} would overwrite {who}'s {key}", tag)
        for out, (where, tag) in self.owner.items():
            parent = os.path.dirname(out)
            while inside(parent, self.out):
                if parent in self.owner:
                    self.p.add(f"{where}: output {out} needs {parent} as a directory, but it is the output of "
                               f"{self.owner[parent][0]}", tag)
                    break
                parent = os.path.dirname(parent)


class JobError(ValueError):
    """A job cannot be used. `.problems` lists every problem found; str() gives them one per line."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)
