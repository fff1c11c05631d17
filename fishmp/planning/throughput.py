"""The throughput cache: frames/s that `plan --measure` recorded per GPU model, read by `plan --explain`.

Kept in FISH_CACHE_DIR/throughput.json, keyed by GPU name, checkpoint content and precision, max_seq_len and
FISH_COMPILE (what changes decoding speed). A cache, never a reason to fail: an absent or damaged file reads empty.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ..config import Settings

log = logging.getLogger("fishmp")


THROUGHPUT_FILE = "throughput.json"


# ---- the throughput cache (plan --explain reads it) ------------------------------------------------------------
def throughput_key(settings: Settings, gpu_name: str) -> str:
    """GPU model + checkpoint content and precision + what changes decoding speed (KV length, torch.compile)."""
    from .checkpoint import engine_fingerprint

    return f"{gpu_name}|{engine_fingerprint(settings)}|max_seq_len={settings.max_seq_len}|compile={settings.compile}"


def _cache_path(settings: Settings) -> str:
    return os.path.join(settings.cache_dir, THROUGHPUT_FILE)


def _read_cache(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent, or damaged: a cache, never a reason to fail
        return {}


def record_throughput(settings: Settings, gpu_name: str, measured: list[dict[str, Any]]) -> None:
    """Merge `measured` ({rows, frames_per_s, measured_gib} each) into the cache, atomically; errors only logged."""
    path = _cache_path(settings)
    data = _read_cache(path)
    entry = data.setdefault(throughput_key(settings, gpu_name), {"gpu": gpu_name, "rows": {}})
    for m in measured:
        if m.get("frames_per_s"):
            entry["rows"][str(m["rows"])] = {**m, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("[Measure] cannot write %s: %s", path, exc.strerror or exc)


def cached_throughput(settings: Settings, gpu_name: str) -> dict[int, dict[str, Any]]:
    """rows -> {frames_per_s, measured_gib, measured_at} that `plan --measure` recorded for these settings."""
    entry = _read_cache(_cache_path(settings)).get(throughput_key(settings, gpu_name), {})
    rows = entry.get("rows", {}) if isinstance(entry, dict) else {}
    return {int(k): v for k, v in rows.items() if str(k).isdigit() and isinstance(v, dict)}
