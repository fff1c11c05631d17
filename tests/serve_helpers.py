"""Shared by the tests/test_server_*.py files: `python -m fishmp serve` as a real process on a free loopback port,
reference audio as a client sends it, and the check that no process outlives the server. Not a test module."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

from fishmp.engines.audio import speech_like

KEY = "test-key-23"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(seconds: float = 1.0, pitch: float = 140.0, seed: int = 0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speech_like(seconds, rate, pitch, seed=seed), rate, format="WAV")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return "data:audio/wav;base64," + b64(data)


def synthetic_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {"FISH_ENGINE": "synthetic", "FISH_CPU_WORKERS": "2", "FISH_MULTIPROCESS_MODE": "true",
           "FISH_SYNTHETIC_LOAD_S": "0.2", "FISH_CACHE_DIR": str(tmp / "cache"), "FISH_SHUTDOWN_GRACE_S": "3"}
    env.update(extra)
    return env


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """One `python -m fishmp serve` process. `stop()` sends SIGTERM and checks the exit code and that no process it
    started (workers, multiprocessing's helpers) is left."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str, api_key: str | None = None,
                 data_dir: Path | None = None, cwd: Path | None = None) -> None:
        self.tmp, self.port = tmp, free_port()
        self.data_dir = data_dir or tmp / "data"
        self.api_key = api_key
        full = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
        full.update(env)
        if api_key:
            full["FISH_API_KEY"] = api_key
        self.log_path = tmp / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "fishmp", "serve", "--port", str(self.port), "--data-dir",
                                      str(self.data_dir), *args], env=full, cwd=str(cwd or tmp), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180.0, workers: int = 1) -> Server:
        """Until /v1/health says `workers` workers are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fishmp serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                r = requests.get(self.url("/v1/health"), timeout=5)
                if r.status_code == 200 and r.json()["workers_ready"] >= workers:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"fishmp serve not ready after {timeout}s:\n{self.log()}")

    def get(self, path: str, **kw: object) -> requests.Response:
        return self.session.get(self.url(path), timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw: object) -> requests.Response:
        return self.session.post(self.url(path), timeout=kw.pop("timeout", 120), **kw)

    def delete(self, path: str, **kw: object) -> requests.Response:
        return self.session.delete(self.url(path), timeout=kw.pop("timeout", 120), **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        """Signal it, wait for its exit, and assert that every process below it is gone too."""
        below = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"fishmp serve did not exit within {timeout}s of {sig}:\n{self.log()}") from None
        finally:
            self._log.close()
            self.session.close()
        deadline = time.monotonic() + 15
        while any(alive(p) for p in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in below if alive(p)]
        for p in left:  # never leave them to the next test
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes left after the server exited: {left}"
        return code


def dominant_hz(wav: bytes) -> float:
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum[1:]) + 1) * rate / len(samples)
