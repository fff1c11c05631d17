"""Time to first audio of streamed lines against the whole line's latency (issue 33), for benchmarks/serve.py.

At each concurrency C (closed loop: C client threads), the same bodies are sent twice, interleaved per level: once as
fish `/v1/tts` `streaming: true` `format: pcm` (time to the first PCM byte, and to the last), once whole (the
answer's latency). The ratio first-audio p50 / whole-line p50 is the figure of merit (target: <= 0.25 at C = 1).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import requests


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return statistics.median(values) if q == 0.5 else values[min(len(values) - 1, int(q * len(values)))]


def _closed_loop(url: str, bodies: list[dict], concurrency: int, streamed: bool) -> dict[str, list[float]]:
    first: list[float] = []
    total: list[float] = []
    todo, lock = list(bodies), threading.Lock()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            t0 = time.monotonic()
            if streamed:
                with session.post(url, json={**body, "streaming": True, "format": "pcm"}, stream=True,
                                  timeout=3600) as r:
                    r.raise_for_status()
                    t_first = None
                    for part in r.iter_content(chunk_size=None):
                        if part and t_first is None:
                            t_first = time.monotonic() - t0
            else:
                session.post(url, json=body, timeout=3600).raise_for_status()
                t_first = None
            with lock:
                total.append(time.monotonic() - t0)
                if t_first is not None:
                    first.append(t_first)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"first": first, "total": total}


def measure(url: str, bodies_for: Any, levels: list[int], per_client: int) -> list[dict[str, Any]]:
    """[{concurrency, first_p50, first_p95, stream_total_p50, whole_p50, whole_p95, ratio}] (seconds)."""
    _closed_loop(url, bodies_for(2), 1, True)  # warm-up
    out = []
    for c in levels:
        n = max(8, c * per_client)
        streamed = _closed_loop(url, bodies_for(n), c, True)
        whole = _closed_loop(url, bodies_for(n), c, False)["total"]
        row = {"concurrency": c, "n": n, "first_p50": _pct(streamed["first"], 0.5),
               "first_p95": _pct(streamed["first"], 0.95), "stream_total_p50": _pct(streamed["total"], 0.5),
               "whole_p50": _pct(whole, 0.5), "whole_p95": _pct(whole, 0.95)}
        row["ratio"] = row["first_p50"] / row["whole_p50"]
        out.append(row)
        print(f"  c={c:3d} first audio p50 {row['first_p50']:.2f}s p95 {row['first_p95']:.2f}s | whole line p50 "
              f"{row['whole_p50']:.2f}s p95 {row['whole_p95']:.2f}s | ratio {row['ratio']:.2f}", flush=True)
    return out
