"""Two probes of docs/security.md against a real `fishmp serve` (synthetic engine): how long other clients wait while
a 100,000-segment job (5.7 MB) is checked and refused, and how much the server's peak RSS grows for a 91 KiB FLAC
that declares 60 s of 8 channels at 192 kHz. Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_hardening.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import Server, data_url, synthetic_env, wav_bytes  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def stall(srv: Server, segments: int = 100000) -> None:
    body = {"speakers": {"a": {"reference_audio": data_url(wav_bytes(1.0, 150.0)), "reference_text": "A."}},
            "segments": [{"id": f"s{i}", "speaker": "a", "text": f"Line {i}."} for i in range(segments)]}
    body["segments"][-1]["speaker"] = "nobody"  # checked to the end, then refused
    raw = json.dumps(body).encode()
    worst, done = [0.0], threading.Event()

    def probe() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            requests.get(srv.url("/v1/health"), timeout=300)
            worst[0] = max(worst[0], time.monotonic() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    r = requests.post(srv.url("/v1/jobs"), data=raw, headers={"Content-Type": "application/json"}, timeout=600)
    took = time.monotonic() - t0
    done.set()
    prober.join()
    print(f"{segments}-segment job ({len(raw) / 1e6:.1f} MB): {r.status_code} in {took:.1f}s; "
          f"worst /v1/health latency meanwhile {worst[0]:.2f}s")


def bomb(srv: Server, tmp: Path) -> None:
    path = tmp / "bomb.flac"
    with sf.SoundFile(path, "w", 192000, 8, format="FLAC", subtype="PCM_16") as f:
        block = np.full((192000, 8), 300, dtype=np.int16)
        for _ in range(60):
            f.write(block)
    data = path.read_bytes()
    before = peak_rss_mib(srv.proc.pid)
    r = requests.post(srv.url("/v1/references/add"), data={"id": "bomb", "text": "t"},
                      files={"audio": ("b.flac", data)}, timeout=600)
    print(f"FLAC bomb ({len(data) / 1024:.0f} KiB, 60 s x 8 ch x 192 kHz): {r.status_code}; "
          f"server peak RSS grew {peak_rss_mib(srv.proc.pid) - before:.0f} MiB")


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    env = synthetic_env(tmp, FISH_CPU_WORKERS="1", FISH_SERVE_MAX_QUEUED="200000", FISH_SERVE_MAX_BODY_MB="100")
    srv = Server(tmp, env).wait_ready()
    try:
        stall(srv)
        bomb(srv, tmp)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
