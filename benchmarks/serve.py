"""`fishmp serve` under load against fish-speech's own engine, in one run (issue 23).

Both answer the same pyvideotrans-style requests (`{"text", "references": [{"audio": <base64 wav>, "text"}]}`, the
reference in every request, `max_new_tokens` fixed so that every answer is the same amount of audio):
- fishmp: `python -m fishmp serve` as a real process, real HTTP clients (one `requests.Session` per client thread);
- upstream: `fish_speech.inference_engine.TTSInferenceEngine` in this process, behind one lock, answering one
  request at a time as its api_server does per process (no HTTP at all: generous to upstream), with the same client
  threads; the wav is written as its api_server writes it. Measured with use_memory_cache "off" (its default, what
  pyvideotrans gets: the reference is encoded again for every request) and "on".
For each concurrency (closed loop: C clients, each sending its next request when the last one is answered) the
configurations run one after the other (interleaved), so a load change from other work hits them alike; the load
average is printed with each. Then one line's latency while a long job runs on the same server, against idle.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve.py --engine tiny --workers 1 --batch-size 8
    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve.py --engine synthetic --no-upstream
    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve.py --first-audio 1,8 --max-new-tokens 200 --batch-size 8
        (streamed lines: time to first audio p50/p95 against the whole line's latency; benchmarks/first_audio.py)
    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve.py --unique-refs --concurrency 1,8 --long-job 0

--unique-refs (issue 32): every request carries a reference never sent before (5-6 s, as pyvideotrans's clone role
cuts one from the original vocals for each subtitle line), so no reference cache can hit. One run reports fishmp with
unique references, fishmp with one shared reference, and upstream with unique references (its cache off: each
reference is new anyway), interleaved per concurrency; both unique configurations get the same references.

Upstream needs two shims on torchaudio >= 2.9 (list_audio_backends and load are gone or need torchcodec); they read
with soundfile, as upstream's own "soundfile" backend did, and run in a temp cwd (upstream writes references/ there).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import requests
from common import ROOT, make_reference_wav, markdown_table, words


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [words(int(rng.integers(40, 90)), rng).capitalize() + "." for _ in range(n)]


class FishmpServer:
    def __init__(self, tmp: str, args: argparse.Namespace, checkpoint: str | None) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
        env.update({"FISH_CPU_WORKERS": str(args.workers), "FISH_BATCH_SIZE": str(args.batch_size),
                    "FISH_MULTIPROCESS_MODE": "true", "FISH_TAKE_CHECK": "false", "FISH_PRECISION": "float32",
                    "FISH_CACHE_DIR": os.path.join(tmp, "cache"), "FISH_SERVE_MAX_QUEUED": "100000",
                    "PYTHONPATH": args.fishmp_root})
        if checkpoint:
            env.update({"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": checkpoint})
        else:
            env.update({"FISH_ENGINE": "synthetic", "FISH_SYNTHETIC_LOAD_S": "0.5",
                        "FISH_SYNTHETIC_SECONDS_PER_CHAR": str(args.synthetic_spc)})
        self.log = open(os.path.join(tmp, "serve.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "fishmp", "serve", "--port", str(self.port), "--data-dir",
                                      os.path.join(tmp, "data")], env=env, cwd=tmp, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            try:
                r = requests.get(self.url("/v1/health"), timeout=5)
                if r.status_code == 200 and r.json()["workers_ready"] >= args.workers:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fishmp serve did not start; see {self.log.name}")
            time.sleep(0.3)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        self.log.close()
        return code


def _quiet_upstream() -> None:
    import warnings

    from loguru import logger

    logger.disable("fish_speech")
    for pattern in (".*copy construct from a tensor.*", ".*autocast.*", ".*Autocast.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _shim_torchaudio() -> None:
    import soundfile as sf
    import torch
    import torchaudio

    if not hasattr(torchaudio, "list_audio_backends"):
        torchaudio.list_audio_backends = lambda: ["soundfile"]

    def load(source: Any, backend: str | None = None, **_: Any) -> tuple[Any, int]:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), rate

    torchaudio.load = load


class Upstream:
    """fish-speech's TTSInferenceEngine on the same checkpoint, one request at a time."""

    def __init__(self, checkpoint: str, cache: str) -> None:
        _shim_torchaudio()
        _quiet_upstream()
        import torch
        from fish_speech.inference_engine import TTSInferenceEngine
        from fish_speech.models.text2semantic.inference import launch_thread_safe_queue

        from fishmp.engines.fish_common import CODEC_OVERRIDES_FILE, build_codec

        queue = launch_thread_safe_queue(checkpoint, "cpu", torch.float32, compile=False)
        overrides_path = os.path.join(checkpoint, CODEC_OVERRIDES_FILE)  # the tiny codec's shapes (fishmp/engines/tiny.py)
        codec = build_codec(json.load(open(overrides_path)) if os.path.isfile(overrides_path) else None)
        codec.load_state_dict(torch.load(os.path.join(checkpoint, "codec.pth"), map_location="cpu", weights_only=True),
                              strict=False, assign=True)
        self.engine = TTSInferenceEngine(queue, codec.to(dtype=torch.float32).eval(), torch.float32, False)
        self.cache = cache
        self.lock = threading.Lock()

    def answer(self, body: dict) -> bytes:
        import soundfile as sf
        from fish_speech.utils.schema import ServeTTSRequest

        req = ServeTTSRequest(**{**body, "use_memory_cache": self.cache})
        with self.lock:  # the api_server's one inference thread
            for result in self.engine.inference(req):
                if result.code == "error":
                    raise RuntimeError(result.error)
                if result.code == "final":
                    buf = io.BytesIO()
                    sf.write(buf, result.audio[1], result.audio[0], format="wav")
                    return buf.getvalue()
        raise RuntimeError("no audio")


def _run(send: Any, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """C client threads in a closed loop over `bodies`; requests/s and latency percentiles."""
    latencies: list[float] = []
    todo = list(bodies)
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            t0 = time.monotonic()
            try:
                send(session, body)
            except Exception as exc:  # noqa: BLE001 - counted, shown
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.monotonic() - t0)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[0]}", flush=True)
    lat = sorted(latencies)
    return {"rps": len(lat) / wall, "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "n": len(lat), "wall": wall, "errors": len(errors)}


def _fishmp_send(server: FishmpServer) -> Any:
    def send(session: requests.Session, body: dict) -> bytes:
        r = session.post(server.url("/v1/tts"), json=body, timeout=3600)
        r.raise_for_status()
        return r.content

    return send


def _line_latency(server: FishmpServer, body: dict, long_job: int, ref_b64: str) -> dict[str, Any]:
    send, session = _fishmp_send(server), requests.Session()

    def five() -> list[float]:
        out = []
        for _ in range(5):
            t0 = time.monotonic()
            send(session, body)
            out.append(time.monotonic() - t0)
        return out

    idle = five()
    texts = _texts(long_job)
    job = {"speakers": {"film": {"reference_audio": "data:audio/wav;base64," + ref_b64, "reference_text": "A film."}},
           "segments": [{"speaker": "film", "text": t, "params": {"max_new_tokens": body["max_new_tokens"]}}
                        for t in texts]}
    job_id = session.post(server.url("/v1/jobs"), json=job, timeout=60).json()["id"]
    while session.get(server.url(f"/v1/jobs/{job_id}"), timeout=60).json()["counts"]["done"] < 2:
        time.sleep(0.2)
    busy = five()
    view = session.get(server.url(f"/v1/jobs/{job_id}"), timeout=60).json()
    session.delete(server.url(f"/v1/jobs/{job_id}"), timeout=60)
    return {"idle_s": statistics.median(idle), "busy_s": statistics.median(busy), "job_segments": long_job,
            "job_done_meanwhile": view["counts"]["done"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("tiny", "synthetic"), default="tiny")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per client thread (at least 16 in all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--synthetic-spc", type=float, default=0.002, help="synthetic engine: seconds per character")
    p.add_argument("--long-job", type=int, default=120, help="segments of the long job (0: skip that part)")
    p.add_argument("--no-upstream", action="store_true")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--first-audio", help="only this: streamed lines' time to first audio at these concurrencies "
                   "(e.g. 1,8) against the whole line's latency")
    p.add_argument("--fishmp-root", default=ROOT, help="the fishmp checkout the server runs (default: this one)")
    p.add_argument("--unique-refs", action="store_true", help="each request its own new 5-6 s reference (see above)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="fishmp-serve-bench-") as tmp:
        checkpoint = None
        if args.engine == "tiny":
            from fishmp.engines.tiny import write_checkpoint

            checkpoint = os.path.join(tmp, "tiny")
            write_checkpoint(checkpoint, "tiny")
        ref = make_reference_wav(os.path.join(tmp, "ref.wav"), seconds=3.0)
        with open(ref, "rb") as f:
            ref_b64 = base64.b64encode(f.read()).decode()
        server = FishmpServer(tmp, args, checkpoint)
        try:
            if args.first_audio:
                return _first_audio(server, args, ref_b64)
            results, line, wall = _measure(server, args, levels, checkpoint, tmp, ref_b64)
        finally:
            code = server.stop()
    _report(args, results, line, wall, code)
    return 0


def _first_audio(server: FishmpServer, args: argparse.Namespace, ref_b64: str) -> int:
    from first_audio import measure

    def bodies(n: int) -> list[dict]:
        return [{"text": t, "references": [{"audio": ref_b64, "text": "This is the reference voice."}],
                 "max_new_tokens": args.max_new_tokens} for t in _texts(n)]

    rows = measure(server.url("/v1/tts"), bodies, [int(c) for c in args.first_audio.split(",")],
                   args.requests_per_client)
    print(f"\nengine {args.engine}, {args.workers} worker(s) x FISH_BATCH_SIZE={args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, load {os.getloadavg()[0]:.2f}")
    print(markdown_table(["clients", "first audio p50 s", "p95 s", "streamed line done p50 s", "whole line p50 s",
                          "p95 s", "first audio / whole line"],
                         [[r["concurrency"], f"{r['first_p50']:.2f}", f"{r['first_p95']:.2f}",
                           f"{r['stream_total_p50']:.2f}", f"{r['whole_p50']:.2f}", f"{r['whole_p95']:.2f}",
                           f"{r['ratio']:.2f}"] for r in rows]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "first_audio": rows}, f, indent=1)
    return 0


class UniqueRefs:
    """Reference wavs (base64) never used before: 5-6 s each, every one a different voice (seeded); block k of n is
    the same for every configuration that asks for it."""

    def __init__(self, tmp: str) -> None:
        self.dir = os.path.join(tmp, "unique-refs")
        self.made: list[str] = []

    def block(self, k: int, n: int) -> list[str]:
        while len(self.made) < (k + 1) * n:
            i = len(self.made)
            seconds = 5.0 + (i * 0.37) % 1.0
            path = make_reference_wav(os.path.join(self.dir, f"{i}.wav"), seconds=seconds, seed=1000 + i)
            with open(path, "rb") as f:
                self.made.append(base64.b64encode(f.read()).decode())
            os.unlink(path)
        return self.made[k * n:(k + 1) * n]


def _measure(server: FishmpServer, args: argparse.Namespace, levels: list[int], checkpoint: str | None, tmp: str,
             ref_b64: str) -> tuple[list[dict], dict | None, float]:
    fishmp = _fishmp_send(server)
    configs: dict[str, Any] = {"fishmp unique refs": fishmp, "fishmp shared ref": fishmp} if args.unique_refs else \
        {"fishmp": fishmp}
    if checkpoint and not args.no_upstream:
        cwd = os.getcwd()
        os.chdir(tmp)  # upstream writes references/ into the cwd
        try:
            for cache in ("off",) if args.unique_refs else ("off", "on"):
                up = Upstream(checkpoint, cache)
                name = "upstream unique refs" if args.unique_refs else f"upstream cache {cache}"
                configs[name] = (lambda u: lambda s, b: u.answer(b))(up)
        finally:
            os.chdir(cwd)
    unique = UniqueRefs(tmp)
    blocks = [0]  # the next block of unique references

    def bodies(n: int, name: str = "", block: int | None = None) -> list[dict]:
        refs = unique.block(block, n) if "unique" in name and block is not None else [ref_b64] * n
        return [{"text": t, "references": [{"audio": r, "text": "This is the reference voice."}],
                 "max_new_tokens": args.max_new_tokens} for t, r in zip(_texts(n), refs, strict=True)]

    for name, send in configs.items():  # warm-up: the first request of each pays one-time costs
        _run(send, bodies(2, name, 0), 1)
    blocks[0] += 1
    results: list[dict[str, Any]] = []
    t_start = time.monotonic()
    for c in levels:
        n = max(16, c * args.requests_per_client)
        block = blocks[0]
        blocks[0] += 1
        for name, send in configs.items():
            load = os.getloadavg()[0]
            r = _run(send, bodies(n, name, block), c)
            results.append({"config": name, "concurrency": c, "load": load, **r})
            print(f"  c={c:3d} {name:18s} {r['rps']:6.2f} req/s  p50 {r['p50']:6.2f}s  p95 {r['p95']:6.2f}s  "
                  f"n={r['n']}  load {load:.2f}", flush=True)
    line = _line_latency(server, bodies(1)[0], args.long_job, ref_b64) if args.long_job else None
    return results, line, time.monotonic() - t_start


def _report(args: argparse.Namespace, results: list[dict], line: dict | None, wall: float, code: int) -> None:
    rows = []
    for r in results:
        ratios = []
        bases = ("upstream unique refs", "fishmp shared ref") if args.unique_refs else \
            ("upstream cache off", "upstream cache on")
        for name in bases:
            base = next((u for u in results if u["config"] == name and u["concurrency"] == r["concurrency"]), None)
            ratios.append(f"{r['rps'] / base['rps']:.2f}x" if base else "-")
        rows.append([r["concurrency"], r["config"], f"{r['rps']:.2f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}", r["n"],
                     *ratios, f"{r['load']:.2f}"])
    print()
    print(f"engine {args.engine}, {args.workers} worker(s) x FISH_BATCH_SIZE={args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, wall {wall:.0f} s, server exit {code}")
    heads = ["vs upstream, unique refs", "vs fishmp, shared ref"] if args.unique_refs else \
        ["vs upstream, same requests", "vs upstream, cache on"]
    print(markdown_table(["clients", "config", "req/s", "p50 s", "p95 s", "requests", *heads, "load avg"], rows))
    if line:
        print(f"\none line: {line['idle_s']:.2f} s idle, {line['busy_s']:.2f} s while a {line['job_segments']}-segment "
              f"job runs ({line['busy_s'] / line['idle_s']:.2f}x; the job did {line['job_done_meanwhile']} meanwhile)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "line": line}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
