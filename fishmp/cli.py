"""`python -m fishmp`: plan, generate, encode, demo, tiny-checkpoint, install-legacy-scripts, schema, serve, job-from-subtitles.
`main(argv) -> exit code`, testable in-process.

Exit codes: 0 all done; 1 some segments failed (the rest are written); 2 invalid job or configuration;
4 every segment written but some are suspect (no take passed the take check; legacy configs keep 0);
5 the final manifest.json could not be written (disk full...: the result line says why; it wins over 0, 1, 4 and
the interruption codes; legacy configs keep their own codes and say so on stderr);
130 / 143 interrupted by SIGINT / SIGTERM. Legacy configs: 0 whenever something was done (see legacy.py).
Logs go to stderr; stdout carries only machine output.
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
from .job import JobError, subtitles
from .running.outputlock import OutputDirError

log = logging.getLogger("fishmp")
SUSPECT_EXIT = 4  # every segment has its wav, but some are suspect (no take passed the take check)

EPILOG = """environment (also read from ./.env; the real environment wins): FISH_MULTIPROCESS_MODE, FISH_MODEL_MEMORY_GB,
FISH_CHECKPOINT_DIR, FISH_PRECISION, FISH_COMPILE, FISH_DEVICES, FISH_MAX_WORKERS, FISH_MEMORY_RESERVE,
FISH_CPU_WORKERS, FISH_ENGINE ... see .env.example. Exit codes: 0 ok, 1 some segments failed, 2 invalid job or
configuration, 3 output directory in use by another job, 4 all written but some suspect (take check), 5 the final
manifest could not be written, 130/143 interrupted (legacy configs: 0 when anything was done). FISH_BATCH_SIZE,
FISH_BACKEND, FISH_OUTPUT_ROOT: see README."""


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
    sp.add_argument("--explain", action="store_true", help="estimate one worker's GPU memory from the checkpoint "
                    "(FISH_CHECKPOINT_DIR) component by component, what each GPU then holds, workers x rows "
                    "alternatives and suggestions (with --json: under 'explain')")
    sp.add_argument("--reference-seconds", type=float, default=30.0, metavar="S", help="--explain: the longest "
                    "reference audio a worker encodes (default 30)")
    sp.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="--explain: the longest output a "
                    "segment may generate, in frames of 1/21.5 s (default 1024, fishmp's max_new_tokens default)")
    sp.add_argument("--measure", action="store_true", help="start one real worker per GPU model present, run a "
                    "warm-up segment and print its real memory (NVML) next to the estimate; no GPU: says so, exit 0")

    sg = sub.add_parser("generate", help="synthesize a job (or a legacy generate config)",
                        description="Synthesize every segment of JOB to a wav in its speaker's voice. JOB is a fishmp "
                        "job file or a legacy {'mode': 'generate'} config.")
    sg.add_argument("job", metavar="JOB", help="job JSON file")
    sg.add_argument("-o", "--output-dir", help="where wavs and manifest.json go (default: the legacy config's "
                    "output_dir, else fishmp-out/<job file stem>)")
    sg.add_argument("--progress", choices=("auto", "bar", "jsonl", "plain", "legacy", "none"), default="auto",
                    help="auto: legacy for legacy configs, else a bar on a TTY and plain lines on stderr; jsonl: one "
                    "JSON event per line on stdout; legacy: plain lines plus the old scripts' progress lines")
    sg.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="skip segments whose wav exists and whose inputs are unchanged (default); --no-resume redoes all")
    sg.add_argument("--skip-invalid", action="store_true", help="leave out segments (and speakers) that fail "
                    "validation, listing them on stderr, instead of rejecting the job (always on for legacy configs)")
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

    si = sub.add_parser("install-legacy-scripts", help="write the scripts a dubbing backend calls, as fishmp shims",
                        description="Write fish_batch_generate.py, fish_multiprocess_generate.py and "
                        "fish_simple_encode.py into DIR (the backend's script directory), each exec'ing this Python "
                        "with -m fishmp generate|encode. Scripts there that are not shims are kept as NAME.orig.")
    si.add_argument("dir", metavar="DIR")
    # Required: the backend's configs are temp files naming output_dirs elsewhere, which fishmp refuses unless they lie
    # under FISH_OUTPUT_ROOT; without it every job would fail after the switch.
    si.add_argument("--output-root", metavar="PATH", required=True, help="FISH_OUTPUT_ROOT for the shims (unless the "
                    "environment sets one): the directory the backend's output_dirs lie under, since its configs are "
                    "temp files (a config whose output_dir is elsewhere is refused)")
    sv = sub.add_parser("serve", help="serve the HTTP APIs (fish /v1/tts, OpenAI speech, jobs) on one warm pool",
                        description="Start one worker pool from the FISH_* settings and answer fish-speech's /v1/tts "
                        "and references API, OpenAI's /v1/audio/speech and fishmp's job API on it until SIGTERM / "
                        "Ctrl-C (see README, 'Server').")
    sv.add_argument("--host", help="address to listen on (FISH_SERVE_HOST, default 127.0.0.1; beyond loopback an API "
                    "key is required)")
    sv.add_argument("--port", type=int, help="TCP port (FISH_SERVE_PORT, default 8080)")
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /v1/health "
                    "(FISH_API_KEY; prefer the variable: options show in ps)")
    sv.add_argument("--data-dir", help="stored references and jobs (FISH_SERVE_DATA_DIR, default fishmp-serve)")
    sv.add_argument("--root", metavar="DIR", help="let requests name files on this machine, inside DIR only "
                    "(default: no paths at all)")
    sub.add_parser("schema", help="print the JSON Schema of fishmp's job format",
                   description="Print the JSON Schema (draft 2020-12) of fishmp's job format on stdout, for apps "
                   "that build job files. Loading a job checks more (files exist, unique ids, outputs inside).")
    subtitles.add_parser(sub)  # job-from-subtitles (fishmp/job/subtitles.py)
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
    except OutputDirError as exc:  # e.g. another job holds the output directory (exit 3)
        print(f"fishmp: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before the job loop's own handlers were installed (e.g. while planning)
        print("fishmp: interrupted", file=sys.stderr)
        return 130


class _UsageError(Exception):
    pass


def _cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from .api import plan_for
    from .planning.gpus import GIB, GpuSpecError, nvml_inventory, parse_gpu_spec, select_devices
    from .planning.memory import CheckpointReadError
    from .planning.plan import make_plan, plan_log_lines

    try:
        gpus = parse_gpu_spec(args.gpus) if args.gpus else None
        if args.measure:
            return _plan_measure(args, settings, select_devices(nvml_inventory() if gpus is None else gpus,
                                                                settings.devices))
        from .planning.explain import plan_settings

        settings, auto_note = plan_settings(settings)  # FISH_MODEL_MEMORY_GB=auto: the estimate, nothing started
        if not args.explain:
            plan = plan_for(settings, gpus, args.segments)
        else:
            from .planning.explain import estimate_for, explain, explain_lines

            if not (args.reference_seconds > 0 and args.max_new_tokens > 0):
                raise _UsageError("--reference-seconds and --max-new-tokens must be greater than 0")
            work = {"reference_s": args.reference_seconds, "new_tokens": args.max_new_tokens}

            def variant(**kw: Any) -> Any:
                w = {**work, **{k: kw.pop(k) for k in list(kw) if k in work}}
                return estimate_for(settings.replace(**kw), **w)

            est = variant()
            inventory = select_devices(nvml_inventory() if gpus is None else gpus, settings.devices)
            plan = make_plan(inventory, settings, args.segments, row_gib=est.kv_row_bytes / GIB)
            from .planning.throughput import cached_throughput

            measured = settings.replace(max_seq_len=est.max_seq_len)  # the key plan --measure recorded under
            details = explain(plan, est, settings, variant, {g.name: cached_throughput(measured, g.name) for g in inventory})
    except GpuSpecError as exc:
        raise _UsageError(str(exc)) from None
    except CheckpointReadError as exc:
        raise _UsageError(f"plan --explain reads the checkpoint: {exc}; `python -m fishmp tiny-checkpoint DIR --size "
                          "s1-mini` writes a random one of the real size") from None
    for line in plan_log_lines(plan) + ([auto_note] if auto_note else []):
        log.info(line)
    data = plan.to_dict()
    if args.explain:
        for line in explain_lines(details):
            log.info(line)
        data["explain"] = details
    if args.json:
        print(json.dumps(data))
    return 0


def _plan_measure(args: argparse.Namespace, settings: Settings, gpus: list) -> int:
    """plan --measure: exit 0 when measured (or when there is no GPU to measure), 1 when a worker failed."""
    from .measure import measure, measure_lines
    from .planning.explain import estimate_for

    if settings.engine != "fish":
        raise _UsageError(f"plan --measure measures Fish Speech workers; FISH_ENGINE is {settings.engine!r}")
    if not gpus:
        log.info("[Measure] no GPU visible (NVML sees none, or FISH_DEVICES=cpu): nothing to measure")
        if args.json:
            print(json.dumps({"measured": [], "reason": "no GPU"}))
        return 0
    results = measure(gpus, settings, estimate_for(settings).max_seq_len)
    for line in measure_lines(results):
        log.info(line)
    if args.json:
        print(json.dumps({"measured": results}))
    return 1 if any("error" in r for r in results) else 0


def _install_signal_handlers(pool: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        pool.request_stop(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from .api import finish_without_workers
    from .job import load_job
    from .legacy import exit_code, generate_mapping
    from .running.progress import make_renderer

    job = load_job(args.job, args.output_dir, skip_invalid=True if args.skip_invalid else None,
                   output_root=settings.output_root, voices=_reference_store())
    legacy = job.legacy == "generate"
    invalid = (job.items or len(job.segments)) - len(job.segments)
    for problem in job.skipped:
        log.error("[Main] skipped: %s", problem)
    settings = _with_checkpoint(settings, job.checkpoint_dir)
    from .running.results import output_dir_problem, suspect_count

    if problem := output_dir_problem(job.output_dir):
        raise _UsageError(problem)
    todo = _remaining(job, settings, args.resume)
    mode = "legacy" if legacy and args.progress == "auto" else args.progress
    renderer = make_renderer(mode, items=job.items, already=invalid)
    try:
        # Nothing left (a re-run of a finished job): no worker starts, no model loads (README: workers only for
        # the segments left). A segment undone since the count (its wav deleted meanwhile) falls back to workers.
        result = finish_without_workers(job, settings, on_event=renderer, resume=args.resume) if not todo else None
        lost = None
        if result is None:
            result, lost = _run_with_workers(args, settings, job, max(todo, 1), renderer)
    finally:
        if renderer is not None:
            renderer.close()
    if result.error:
        log.error("[Main] %s", result.error)
    if result.manifest_error:
        log.error("[Main] wavs: %s; manifest.json NOT written (%s)", result.output_dir, result.manifest_error)
    else:
        log.info("[Main] wavs and manifest: %s", result.output_dir)
    if legacy:  # the contract of the scripts fishmp replaces: the LAST stdout line, exit 0 with what succeeded
        code = exit_code(result.count("done"), result.outcome_exit_code)  # their contract: no exit 5 (said on stderr)
        sys.stderr.flush()  # a backend reads stderr merged into stdout: nothing may follow the result line
        _print_result(generate_mapping(job, result.records))
        return _exit_now(code) if lost else code
    code = 1 if invalid and result.exit_code == 0 else result.exit_code
    suspect = suspect_count(result.records)
    if suspect:
        log.warning("[Main] %d of %d segments are suspect: no take passed the take check; their best takes are "
                    "written (see \"takes\" in the manifest)", suspect, result.count("done"))
        code = SUSPECT_EXIT if code == 0 else code  # failures (1) and interruptions say more
    _print_result({"output_dir": result.output_dir, "manifest": result.manifest_path, "done": result.count("done"),
                   "failed": result.count("failed"), "pending": result.count("pending"), "invalid": invalid,
                   "suspect": suspect, "exit_code": code,
                   **({"manifest_error": result.manifest_error} if result.manifest_error else {})})
    return _exit_now(code) if lost else code


def _exit_now(code: int) -> int:
    """After the Ray cluster's head was lost: Ray's own teardown at interpreter exit waits for the lost GCS until
    Ray ends the process with its code. Everything is written and said: leave now, with ours."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _run_with_workers(args: argparse.Namespace, settings: Settings, job: Any, todo: int,
                      renderer: Any) -> tuple[Any, str | None]:
    """Plan workers for `todo` segments, start them, run the job with the CLI's signal handlers. Returns the result
    and, with FISH_BACKEND=ray, why the cluster was lost (None when it was not)."""
    from .api import Pool, plan_for
    from .planning.gpus import GpuSpecError, parse_gpu_spec

    try:
        gpus = parse_gpu_spec(args.gpus) if args.gpus else None
        plan = plan_for(settings, gpus, todo)
    except GpuSpecError as exc:
        raise _UsageError(str(exc)) from None
    pool = Pool(settings, plan=plan, job=job)
    try:
        _install_signal_handlers(pool)
        with _logs_above_the_bar(renderer):
            result = pool.generate(job, on_event=renderer, resume=args.resume)
    finally:
        pool.close()
    return result, pool.cluster_lost


def _remaining(job: Any, settings: Settings, resume: bool) -> int:
    """Segments a (resumed) job still has to do: workers are planned for those only."""
    from .api import resolve_settings
    from .planning.checkpoint import engine_fingerprint
    from .running.jobrun import remaining_segments

    return remaining_segments(job, engine_fingerprint(resolve_settings(settings, job)), resume)


def _print_result(obj: Any) -> None:
    """The last stdout line. A reader that went away costs nothing: the results are on disk."""
    try:
        print(json.dumps(obj, ensure_ascii=False), flush=True)
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet


def _logs_above_the_bar(renderer: Any) -> Any:
    """While a bar is drawn, log lines are written above it instead of through it."""
    from .running.progress import Bar

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
    from .planning.checkpoint import CHECKPOINT_FILES

    missing = [f for f in CHECKPOINT_FILES if f != "special_tokens.json"
               and not os.path.isfile(os.path.join(settings.checkpoint_dir, f))]
    if missing:
        raise _UsageError(
            f"checkpoint {settings.checkpoint_dir!r} lacks {', '.join(missing)}: download openaudio-s1-mini there "
            "(see README, 'Real weights') or set FISH_CHECKPOINT_DIR; `python -m fishmp demo` needs no download")
    return settings


def _cmd_encode(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from .api import Pool, plan_for
    from .job import load_encode_config
    from .legacy import ENCODE_TAG, exit_code
    from .worker.references import codebook_sizes, engine_fingerprint, reuse_encoded

    # The backends' encode step echoes only lines holding [Encode] or INFO (its generate step [Main]...): every line
    # that says what happened to a speaker carries ENCODE_TAG, so a speaker dropped is never dropped silently.
    job = load_encode_config(args.config, skip_invalid=None, output_root=settings.output_root)
    for problem in job.skipped:
        log.error("%s skipped: %s", ENCODE_TAG, problem)
    settings = _with_checkpoint(settings, job.checkpoint_dir)
    total = job.listed or len(job.items)
    finished = [total - len(job.items)]
    # A re-run: speakers whose reference the cache already holds for this checkpoint need no worker (no model load);
    # an npy that already holds those tokens is left untouched.
    fingerprint, sizes = engine_fingerprint(settings), codebook_sizes(settings)
    left = []
    for it in job.items:
        try:
            how = reuse_encoded(it.reference_audio, it.output_npy, fingerprint, settings.cache_dir, sizes)
        except OSError as exc:  # the npy cannot be written: the worker's write reports it as before
            how = None
            log.warning("%s speaker %s: cannot reuse the reference cache: %s", ENCODE_TAG, it.speaker_id, exc)
        if how is None:
            left.append(it)
            continue
        finished[0] += 1
        log.info("%s encoded %d/%d: speaker %s: %s (from the reference cache%s)", ENCODE_TAG, finished[0], total,
                 it.speaker_id, it.output_npy, ", unchanged" if how == "unchanged" else "")

    def progress(ev: dict) -> None:
        if ev["event"] == "speaker_encoded":
            finished[0] += 1
            log.info("%s encoded %d/%d: speaker %s: %s", ENCODE_TAG, finished[0], total, ev["speaker_id"], ev["path"])

    errors: dict[str, str] = {}
    interrupted = 0
    if left:
        # Encoding is a short codec pass per speaker: one worker, never the full plan.
        with Pool(settings, plan=plan_for(settings, None, 1)) as pool:
            _install_signal_handlers(pool)
            errors = pool.encode(dataclasses.replace(job, items=tuple(left)), on_event=progress)
            interrupted = pool.interrupted
    for sid, msg in errors.items():
        log.error("%s speaker %s failed: %s", ENCODE_TAG, sid, msg)
    sys.stderr.flush()
    _print_result([{"speaker_id": it.speaker_id, "npy_file": it.output_npy} for it in job.items
                   if str(it.speaker_id) not in errors])
    return 128 + interrupted if interrupted else exit_code(len(job.items) - len(errors), 1 if errors else 0)


def _cmd_install(args: argparse.Namespace, settings: Settings) -> int:
    from .legacy import install_scripts

    try:
        for line in install_scripts(args.dir, args.output_root):
            log.info("[Main] %s", line)
    except OSError as exc:
        raise _UsageError(f"cannot install the legacy scripts in {args.dir}: {exc}") from None
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(args.output_dir, args.workers, settings)


def _cmd_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from .engines.tiny import write_checkpoint

    write_checkpoint(args.dir, size=args.size)
    log.info("[Main] wrote a random %s checkpoint to %s (random weights: the audio is noise)", args.size, args.dir)
    return 0


def _reference_store() -> Any:
    """A job's reference_id names a voice stored by `fishmp serve`: read from FISH_SERVE_DATA_DIR's store."""
    from .config import ServeSettings
    from .server.refstore import References

    return References(ServeSettings.from_env().data_dir)


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .server.main import serve

    return serve(args, _with_checkpoint(settings, None))


def _cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from .job.schema import job_schema

    _print_result(job_schema())
    return 0


COMMANDS = {"plan": _cmd_plan, "generate": _cmd_generate, "encode": _cmd_encode, "demo": _cmd_demo,
            "tiny-checkpoint": _cmd_tiny, "install-legacy-scripts": _cmd_install,
            "schema": _cmd_schema, "serve": _cmd_serve, "job-from-subtitles": subtitles.run}
