"""`python -m fishmp demo`: a real Fish Speech job on a machine with nothing downloaded.

It builds a tiny random checkpoint (the real architecture, random weights) and three synthetic reference voices,
then runs a 3-speaker, 12-segment job through the real Fish Speech engine with 2 workers. The output is noise,
because the weights are random; the point is to see the whole pipeline run. With real weights, see README.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from .config import Settings
from .engines.audio import speech_like

log = logging.getLogger("fishmp")

LINES = [
    "Welcome back to the channel.", "Today we are testing a new recipe.", "It only takes twenty minutes!",
    "First, chop the onions finely.", "Wait, is that too much salt?", "No, it is exactly right.",
    "Let it simmer for a while.", "Meanwhile, prepare the sauce.", "That smells wonderful.",
    "Serve it warm with fresh bread.", "Thanks for watching, everyone.", "See you next week!",
]
VOICES = {"host": 120.0, "guest": 210.0, "narrator": 160.0}  # fundamental frequency of each synthetic voice


def write_demo_job(root: str) -> str:
    """Reference wavs and job.json under `root`; returns the job file path."""
    import soundfile as sf

    refs = os.path.join(root, "refs")
    os.makedirs(refs, exist_ok=True)
    speakers = {}
    for i, (name, pitch) in enumerate(VOICES.items()):
        path = os.path.join(refs, f"{name}.wav")
        sf.write(path, speech_like(3.0, 44100, pitch, seed=i), 44100)
        speakers[name] = {"reference_audio": f"refs/{name}.wav", "reference_text": f"Hello, I am the {name}."}
    names = list(VOICES)
    job = {
        "speakers": speakers,
        "segments": [{"id": f"{i + 1:04d}", "speaker": names[i % 3], "text": text} for i, text in enumerate(LINES)],
        # Random weights never emit end-of-speech: cap each segment at ~2 s of audio to keep the demo short.
        "params": {"max_new_tokens": 40, "temperature": 0.7, "top_p": 0.8, "seed": 42},
    }
    path = os.path.join(root, "job.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(job, f, indent=1)
    return path


def run_demo(output_dir: str, workers: int, settings: Settings) -> int:
    from .api import Pool, plan_for
    from .engines.tiny import write_checkpoint
    from .job import load_job
    from .running.progress import make_renderer

    root = os.path.abspath(output_dir)
    ckpt = os.path.join(root, "checkpoint")
    if not os.path.isfile(os.path.join(ckpt, "codec.pth")):
        log.info("[Demo] writing a tiny random Fish Speech checkpoint to %s", ckpt)
        write_checkpoint(ckpt, "tiny")
    job = load_job(write_demo_job(root), os.path.join(root, "wavs"))
    settings = settings.replace(engine="fish", checkpoint_dir=ckpt, devices="cpu", cpu_workers=workers,
                                multiprocess_mode="true", cache_dir=os.path.join(root, "cache"),
                                precision="float32",
                                # Random weights never emit end-of-speech: every take would fail the take check
                                # (max_tokens) and be retried twice for nothing. Real weights keep it on.
                                take_check=False)
    renderer = make_renderer("auto")
    with Pool(settings, plan=plan_for(settings, [], len(job.segments))) as pool:
        result = pool.generate(job, on_event=renderer)
    if renderer is not None:
        renderer.close()
    print(f"""
Demo finished: {result.count('done')} of {len(job.segments)} segments in {result.wall_seconds:.1f}s.
  wavs:     {job.output_dir}
  manifest: {result.manifest_path}
The audio is noise: the checkpoint has random weights (it exercises the real Fish Speech code, not a voice).
Its job file is {os.path.relpath(os.path.join(root, 'job.json'))} (the format of README "Jobs"). For real voice cloning,
download the openaudio-s1-mini checkpoint to checkpoints/openaudio-s1-mini (README "Real weights") and run
your own job: python -m fishmp generate job.json""", file=sys.stderr)
    return result.exit_code
