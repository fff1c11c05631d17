"""What the server tells its operator: `GET /metrics` (Prometheus text format) and one log line per request.

Counted as requests come: requests by route, method and status, and their latency (a histogram per route).
Read from the pool at each scrape: segments queued and running, workers by state. From the jobs' events: frames
generated (a counter, and frames/s over the last minute) and each GPU's memory and utilisation (the telemetry's
`gpu` events; absent without NVML).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import Match

from .errors import safe_path

log = logging.getLogger("fishmp")
FRAMES_WINDOW_S = 60.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    def __init__(self, pool_stats: Callable[[], dict], queued: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fishmp_http_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("fishmp_http_request_seconds", "time from request to the last byte answered",
                                 ["route"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))
        self.frames = Counter("fishmp_frames", "codec frames generated (21.5 per second of audio)",
                              registry=self.registry)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._gpus: dict[str, dict] = {}
        self._pool_stats, self._queued = pool_stats, queued
        self.registry.register(self)  # collect() below: the live gauges

    # -- from events (the event loop's thread) ---------------------------------------------------------------------
    def on_event(self, ev: dict) -> None:
        if ev["event"] == "segment_done" and not ev.get("skipped"):
            tokens = int(ev.get("tokens") or 0)
            self.frames.inc(tokens)
            self._recent.append((time.monotonic(), tokens))
        elif ev["event"] == "gpu":
            for g in ev.get("gpus", ()):
                self._gpus[str(g.get("index"))] = g

    def frames_per_s(self) -> float:
        cutoff = time.monotonic() - FRAMES_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / FRAMES_WINDOW_S

    def collect(self) -> Any:
        stats = self._pool_stats()
        running = int(stats.get("running_segments", 0))
        queued = GaugeMetricFamily("fishmp_segments_queued", "segments accepted and not started on a worker yet")
        queued.add_metric([], max(0, self._queued() - running))
        yield queued
        yield GaugeMetricFamily("fishmp_segments_running", "segments running on workers now", value=running)
        workers = GaugeMetricFamily("fishmp_workers", "worker processes by state", labels=["state"])
        for state in ("starting", "ready", "leaving", "dead"):
            workers.add_metric([state], stats.get("workers", {}).get(state, 0))
        yield workers
        yield GaugeMetricFamily("fishmp_frames_per_second", f"frames generated per second over the last "
                                f"{FRAMES_WINDOW_S:g} s", value=self.frames_per_s())
        if self._gpus:
            mem = GaugeMetricFamily("fishmp_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu", "name"])
            util = GaugeMetricFamily("fishmp_gpu_utilization_percent", "GPU utilisation (NVML)", labels=["gpu", "name"])
            for index, g in sorted(self._gpus.items()):
                mem.add_metric([index, str(g.get("name", ""))], float(g.get("used_gib") or 0.0) * 2**30)
                if g.get("util_pct") is not None:
                    util.add_metric([index, str(g.get("name", ""))], float(g["util_pct"]))
            yield mem
            yield util

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestLog:
    """ASGI middleware: after each request, one log line and the request metrics (route = the matched template,
    e.g. /v1/jobs/{job_id}, or "unmatched"; method = one of METHODS or "other": the metrics stay a few series).
    The logged path is escaped (errors.safe_path): a `%0a` in a URL cannot forge a log line."""

    def __init__(self, app: Any, metrics: Metrics, routes: Callable[[], list]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope: dict) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", scope["path"])
        return "unmatched"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, sent = time.monotonic(), [0], [0]

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, watched)
        except BaseException:
            failed = True
            raise
        finally:
            seconds = time.monotonic() - t0
            # 500: answered by Starlette's outermost error handler; 499: the client went away before an answer
            route, code = self._route(scope), status[0] or (500 if failed else 499)
            method = scope["method"] if scope["method"] in METHODS else "other"  # an invented one: no new series
            self.metrics.requests.labels(route, method, str(code)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = (scope.get("client") or ("-",))[0]
            log.info("[Serve] %s %s %s %d %.3fs %dB", client, safe_path(scope["method"]), safe_path(scope["path"]),
                     code, seconds, sent[0])
