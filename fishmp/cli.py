"""`python -m fishmp`: plan, generate, encode, demo, tiny-checkpoint. `main(argv) -> exit code`, testable in-process.

Exit codes: 0 all done; 1 some segments failed (the rest are written); 2 invalid job or configuration;
130 / 143 interrupted by SIGINT / SIGTERM. Logs go to stderr; stdout carries only machine output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from .config import ConfigError, Settings, load_dotenv_file
from .job import JobError

log = logging.getLogger("fishmp")

EPILOG = """environment (also read from ./.env; the real environment wins): FISH_MULTIPROCESS_MODE, FISH_MODEL_MEMORY_GB,
FISH_CHECKPOINT_DIR, FISH_PRECISION, FISH_COMPILE, FISH_DEVICES, FISH_MAX_WORKERS, FISH_MEMORY_RESERVE,
FISH_CPU_WORKERS, FISH_ENGINE ... see .env.example. Exit codes: 0 ok, 1 some segments failed, 2 invalid job or
configuration, 130/143 interrupted."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fishmp", description="Multi-process, multi-GPU voice cloning with "
                                "Fish Speech: one wav per segment, in each speaker's cloned voice.", epilog=EPILOG)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("plan", help="show how many workers each GPU holds", description="Print the worker plan for "
                        "this machine (or a simulated one) in the user guide's log format on stderr.")
    sp.add_argument("--gpus", metavar="SPEC", help="simulate GPUs instead of asking NVML: 'NAME:GiB,NAME:GiB' or "
                    "'24,24' (GiB totals), e.g. 'NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24'")
    sp.add_argument("--segments", type=int, metavar="N", help="plan for a job of N segments (never more workers)")
    sp.add_argument("--json", action="store_true", help="print the plan as one JSON object on stdout")

    sg = sub.add_parser("generate", help="synthesize a job (or a legacy generate config)",
                        description="Synthesize every segment of JOB to a wav in its speaker's voice. JOB is a fishmp "
                        "job file or a legacy {'mode': 'generate'} config.")
    sg.add_argument("job", metavar="JOB", help="job JSON file")
    sg.add_argument("-o", "--output-dir", help="where wavs and manifest.json go (default: the legacy config's "
                    "output_dir, else fishmp-out/<job file stem>)")
    sg.add_argument("--progress", choices=("auto", "bar", "jsonl", "plain", "none"), default="auto",
                    help="auto: a bar on a TTY, plain lines on stderr otherwise; jsonl: one JSON event per line on stdout")
    sg.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="skip segments whose wav exists and whose inputs are unchanged (default); --no-resume redoes all")
    sg.add_argument("--gpus", metavar="SPEC", help=argparse.SUPPRESS)

    se = sub.add_parser("encode", help="encode speakers' reference audio to prompt tokens (legacy encode config)",
                        description="Encode each speaker's reference audio to a .npy of prompt tokens. The last stdout "
                        "line is a JSON list [{'speaker_id': ..., 'npy_file': ...}].")
    se.add_argument("config", metavar="CONFIG", help="legacy {'mode': 'encode'} config JSON")

    sd = sub.add_parser("demo", help="run a 3-speaker, 12-segment job on a tiny random checkpoint (no download)",
                        description="Build a tiny random Fish Speech checkpoint and three synthetic voices, then run a "
                        "real 12-segment job through the Fish Speech engine with 2 workers. The audio is noise: the "
                        "weights are random.")
    sd.add_argument("-o", "--output-dir", default="fishmp-out/demo", help="default: fishmp-out/demo")
    sd.add_argument("--workers", type=int, default=2, help="CPU workers (default 2)")

    st = sub.add_parser("tiny-checkpoint", help="write a randomly initialised checkpoint in the real layout",
                        description="Write config.json, model.pth, tokenizer.tiktoken, special_tokens.json, codec.pth "
                        "built from fish-speech's own classes with random weights.")
    st.add_argument("dir", metavar="DIR")
    st.add_argument("--size", choices=("tiny", "s1-mini"), default="tiny",
                    help="tiny: a few MB, for tests; s1-mini: the real S1-mini size, for GPU memory/speed measurements")
    return p


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        load_dotenv_file()
        settings = Settings.from_env()
        return COMMANDS[args.command](args, settings)
    except ConfigError as exc:
        print(f"fishmp: configuration error: {exc}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        print(f"fishmp: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"fishmp: invalid job {exc.source or ''}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the job loop's own handlers were installed (e.g. while planning)
        print("fishmp: interrupted", file=sys.stderr)
        return 130


class _UsageError(Exception):
    pass


def _cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from .api import plan_for
    from .gpus import GpuSpecError, parse_gpu_spec
    from .plan import plan_log_lines

    try:
        gpus = parse_gpu_spec(args.gpus) if args.gpus else None
        plan = plan_for(settings, gpus, args.segments)
    except GpuSpecError as exc:
        raise _UsageError(str(exc)) from None
    for line in plan_log_lines(plan):
        log.info(line)
    if args.json:
        print(json.dumps(plan.to_dict()))
    return 0


def _install_signal_handlers(pool: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        pool.request_stop(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from .api import Pool, plan_for
    from .gpus import GpuSpecError, parse_gpu_spec
    from .job import load_job
    from .progress import make_renderer

    job = load_job(args.job, args.output_dir)
    settings = _with_checkpoint(settings, job.checkpoint_dir)
    from .results import output_dir_problem

    if problem := output_dir_problem(job.output_dir):
        raise _UsageError(problem)
    try:
        plan = plan_for(settings, parse_gpu_spec(args.gpus) if args.gpus else None, len(job.segments))
    except GpuSpecError as exc:
        raise _UsageError(str(exc)) from None
    renderer = make_renderer(args.progress)
    pool = Pool(settings, plan=plan, job=job)
    try:
        _install_signal_handlers(pool)
        with _logs_above_the_bar(renderer):
            result = pool.generate(job, on_event=renderer, resume=args.resume)
    finally:
        pool.close()
        if renderer is not None:
            renderer.close()
    if result.error:
        log.error("[Main] %s", result.error)
    log.info("[Main] wavs and manifest: %s", result.output_dir)
    if job.legacy == "generate":  # the contract of the scripts fishmp replaces: the LAST stdout line
        mapping = {str(job_seg.legacy_index): job_seg.output for job_seg in job.segments
                   if result.records.get(job_seg.id) and result.records[job_seg.id].status == "done"}
        _print_result(mapping)
    else:
        _print_result({"output_dir": result.output_dir, "manifest": result.manifest_path, "done": result.count("done"),
                       "failed": result.count("failed"), "pending": result.count("pending"),
                       "exit_code": result.exit_code})
    return result.exit_code


def _print_result(obj: Any) -> None:
    """The last stdout line. A reader that went away costs nothing: the results are on disk."""
    try:
        print(json.dumps(obj, ensure_ascii=False), flush=True)
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet


def _logs_above_the_bar(renderer: Any) -> Any:
    """While a bar is drawn, log lines are written above it instead of through it."""
    from .progress import Bar

    if isinstance(renderer, Bar):
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(loggers=[log])
    return contextlib.nullcontext()


def _with_checkpoint(settings: Settings, job_checkpoint: str | None) -> Settings:
    """A legacy config's checkpoint_dir applies unless FISH_CHECKPOINT_DIR is set; the files must be there."""
    if job_checkpoint and "FISH_CHECKPOINT_DIR" not in os.environ:
        settings = settings.replace(checkpoint_dir=job_checkpoint)
    if settings.engine != "fish":
        return settings
    from .engines.checkpoint import CHECKPOINT_FILES

    missing = [f for f in CHECKPOINT_FILES if f != "special_tokens.json"
               and not os.path.isfile(os.path.join(settings.checkpoint_dir, f))]
    if missing:
        raise _UsageError(
            f"checkpoint {settings.checkpoint_dir!r} lacks {', '.join(missing)}: download openaudio-s1-mini there "
            "(see README, 'Real weights') or set FISH_CHECKPOINT_DIR; `python -m fishmp demo` needs no download")
    return settings


def _cmd_encode(args: argparse.Namespace, settings: Settings) -> int:
    from .api import Pool, plan_for
    from .job import load_encode_config

    job = load_encode_config(args.config)
    settings = _with_checkpoint(settings, job.checkpoint_dir)
    # Encoding is a short codec pass per speaker: one worker, never the full plan.
    with Pool(settings, plan=plan_for(settings, None, 1)) as pool:
        _install_signal_handlers(pool)
        errors = pool.encode(job)
        interrupted = pool.interrupted
    for sid, msg in errors.items():
        log.error("[Main] speaker %s: %s", sid, msg)
    _print_result([{"speaker_id": it.speaker_id, "npy_file": it.output_npy} for it in job.items
                   if str(it.speaker_id) not in errors])
    return 128 + interrupted if interrupted else (1 if errors else 0)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(args.output_dir, args.workers, settings)


def _cmd_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from .engines.tiny import write_checkpoint

    write_checkpoint(args.dir, size=args.size)
    log.info("[Main] wrote a random %s checkpoint to %s (random weights: the audio is noise)", args.size, args.dir)
    return 0


COMMANDS = {"plan": _cmd_plan, "generate": _cmd_generate, "encode": _cmd_encode, "demo": _cmd_demo,
            "tiny-checkpoint": _cmd_tiny}
