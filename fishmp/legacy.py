"""The dubbing backends' contract, kept by fishmp so a backend switches without a code change.

A backend's batch cloner writes a config to a temp file and runs one of three scripts of its own,
``[python, <its dir>/<script>, <config>]`` with stderr merged into stdout, reads progress lines as they come
(see `progress.LegacyLines`), raises on any non-zero exit, and parses the LAST line as JSON:

* ``fish_simple_encode.py``  -> ``[{"speaker_id": 3, "npy_file": "/out/speaker_3_codes.npy"}, ...]``
* ``fish_batch_generate.py`` (single process) and ``fish_multiprocess_generate.py`` -> ``{"<segment_index>": wav}``

The old scripts skipped an item that failed and exited 0 with what succeeded; so does fishmp for legacy configs
(`exit_code`). `install_scripts` writes the three scripts as shims that exec ``python -m fishmp generate|encode``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# The tag of `fishmp encode`'s lines: the backends' encode step echoes only lines holding "[Encode]" or "INFO"
ENCODE_TAG = "[Encode]"
SCRIPTS = {"fish_batch_generate.py": "generate", "fish_multiprocess_generate.py": "generate",
           "fish_simple_encode.py": "encode"}
_MARK = "# fishmp shim"


def exit_code(done: int, code: int) -> int:
    """A legacy job that ran exits 0 with whatever succeeded (failures are on stderr and in the manifest); non-zero
    when it was interrupted (130 / 143) or nothing at all could be done (no worker loaded, every item failed)."""
    if code >= 128 or done == 0:
        return code or 1
    return 0


def generate_mapping(job: Any, records: dict[str, Any]) -> dict[str, str]:
    """{segment_index: wav} of the segments that are done (resumed ones included), as the old scripts printed."""
    return {str(seg.legacy_index): seg.output for seg in job.segments
            if records.get(seg.id) is not None and records[seg.id].status == "done"}


def shim_text(command: str, python: str, output_root: str | None) -> str:
    argv = f'[{python!r}, "-m", "fishmp", {command!r}, *sys.argv[1:]]'
    call = (f"os.execve({python!r}, {argv}, {{'FISH_OUTPUT_ROOT': {output_root!r}, **os.environ}})" if output_root
            else f"os.execv({python!r}, {argv})")
    return (f"#!{python}\n{_MARK} (python -m fishmp install-legacy-scripts): runs `fishmp {command}` in its place.\n"
            f"import os, sys\n{call}\n")


def install_scripts(directory: str, output_root: str | None = None, python: str | None = None) -> list[str]:
    """Write the three scripts into `directory` (a backend's script directory), each exec'ing `python` (default:
    this interpreter, whose environment has fishmp) with ``-m fishmp``. A script there that is not a fishmp shim is
    kept as ``<name>.orig`` (never overwritten). `output_root` becomes the shims' FISH_OUTPUT_ROOT unless the
    environment sets one: backends write their configs to temp files and their outputs elsewhere. Returns one line
    per action."""
    python = python or sys.executable
    os.makedirs(directory, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    done = []
    for name, command in SCRIPTS.items():
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not _is_shim(path):
            backup = path + ".orig"
            if os.path.exists(backup):
                raise FileExistsError(f"{path} is not a fishmp shim and {backup} exists: move one of them away")
            os.replace(path, backup)
            done.append(f"kept the original {name} as {backup}")
        tmp = f"{path}.fishmp-tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(shim_text(command, python, os.path.abspath(output_root) if output_root else None))
            os.chmod(tmp, 0o755 & ~umask)  # readable by the backend's user, as the umask allows
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        done.append(f"wrote {path} -> python -m fishmp {command}")
    return done


def _is_shim(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _MARK in f.read(4096)
    except OSError:
        return False
