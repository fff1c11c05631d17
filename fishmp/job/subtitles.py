"""From subtitles to a job: `fishmp job-from-subtitles film.srt|film.vtt`. Pure file conversion (no processes).

Cues are read with the `srt` library (SRT) and webvtt-py's own block parser (WebVTT); fishmp only maps them: one
segment per cue, with `start`/`end` from its timing (so it is fitted to its slot and placed on the film's track) and
its text with markup removed (`<i>`, `{\\an8}`, line breaks become spaces). The speaker of a cue is its `Name:`
prefix (`ANNA: Hello.`), its WebVTT voice span (`<v Anna>Hello.`), or the default speaker (`--speaker`). Each speaker
needs a voice: `--voice NAME=ID` (a stored voice, reference_id), `--voice NAME=ref.wav|transcript`, or a JSON mapping
file (`--voices`: {"NAME": {<a job speaker: reference_audio + reference_text, prompt_tokens, or reference_id>}}).
A malformed cue, a cue that ends before it starts, or a speaker without a voice is a `JobError` naming it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from typing import Any

from .checks import JobError, normalize_text
from .model import REFERENCE_ID

# A speaker prefix: a name of up to 40 characters (letters first; spaces, dots, apostrophes, hyphens), then ": ".
# Not "10:30" (digits first) and not a sentence ("Note that: ..." has too many words: at most 3).
_PREFIX = re.compile(r"^\s*[-–]?\s*([^\W\d_][\w.'’-]*(?: [\w.'’-]+){0,2})\s*:\s+(\S.*)$", re.S)
_TAGS = re.compile(r"<[^>]*>|\{\\[^}]*\}")


def _clean(text: str) -> str:
    return normalize_text(re.sub(r"\s+", " ", _TAGS.sub("", text)))


def _seconds(t: datetime.timedelta) -> float:
    return round(t.total_seconds(), 3)


def _srt_cues(text: str, source: str) -> list[tuple[str, float, float, str, str | None]]:
    """(name, start, end, text, voice) of every cue; a malformed one raises JobError naming it."""
    import srt

    try:
        subs = list(srt.parse(text))
    except srt.SRTParseError as exc:
        good = len(list(srt.parse(text[: exc.expected_start]))) if exc.expected_start else 0
        first = exc.unmatched_content.strip().splitlines()[:2]
        raise JobError([f"{source}: cue {good + 1} (the one after "
                        f"{'the start of the file' if not good else f'cue {good}'}) is malformed: "
                        f"{' / '.join(first)!r}; an SRT cue is a number, then 'HH:MM:SS,mmm --> HH:MM:SS,mmm', "
                        "then its text, then a blank line"], source) from None
    for i, sub in enumerate(subs):
        # srt allows blank lines inside a cue's text, so a malformed cue after it is swallowed as text: a block in the
        # text that starts with a cue number is one
        for block in sub.content.split("\n\n")[1:]:
            lines = block.strip().splitlines()
            if lines and lines[0].strip().isdigit():
                raise JobError([f"{source}: cue {i + 2} (the one after cue {i + 1}) is malformed: "
                                f"{' / '.join(lines[:2])!r}; an SRT cue is a number, then "
                                "'HH:MM:SS,mmm --> HH:MM:SS,mmm', then its text, then a blank line"], source)
    return [(f"cue {s.index}", _seconds(s.start), _seconds(s.end), s.content, None) for s in subs]


def _vtt_seconds(t: Any) -> float:
    """A webvtt Timestamp in seconds, to the millisecond (its own in_seconds() drops the milliseconds)."""
    return round(t.hours * 3600 + t.minutes * 60 + t.seconds + t.milliseconds / 1000, 3)


def _vtt_cues(text: str, source: str) -> list[tuple[str, float, float, str, str | None]]:
    from webvtt import utils
    from webvtt.models import Caption
    from webvtt.vtt import WebVTTCommentBlock, WebVTTCueBlock, WebVTTStyleBlock

    blocks = list(utils.iter_blocks_of_lines(text.splitlines()))
    if not blocks or not blocks[0][0].startswith("WEBVTT"):
        raise JobError([f"{source}: not a WebVTT file (its first line must be WEBVTT)"], source)
    cues = []
    for block in blocks[1:]:
        if WebVTTCommentBlock.is_valid(block) or WebVTTStyleBlock.is_valid(block) or block[0].startswith("REGION"):
            continue
        where = f"cue {len(cues) + 1}"
        if not WebVTTCueBlock.is_valid(block):
            raise JobError([f"{source}: {where} (after {'the header' if not cues else cues[-1][0]}) is malformed: "
                            f"{' / '.join(block[:2])!r}; a WebVTT cue is an optional id, then "
                            "'HH:MM:SS.mmm --> HH:MM:SS.mmm', then its text"], source)
        cue = WebVTTCueBlock.from_lines(block)
        cap = Caption(cue.start, cue.end, cue.payload, cue.identifier)
        name = f"cue {len(cues) + 1}" + (f" ({cue.identifier})" if cue.identifier else "")
        cues.append((name, _vtt_seconds(cap.start_time), _vtt_seconds(cap.end_time), cap.text, cap.voice))
    return cues


def read_cues(path: str) -> list[tuple[str, float, float, str, str | None]]:
    """The cues of an SRT or WebVTT file (by content: a WEBVTT header, else SRT)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError([f"{path}: cannot read the subtitles: {getattr(exc, 'strerror', None) or exc}"], path) from None
    if text.lstrip().startswith("WEBVTT"):
        return _vtt_cues(text.lstrip(), path)
    return _srt_cues(text, path)


def _voice(value: str, where: str) -> dict[str, Any]:
    if "|" in value:
        audio, text = value.split("|", 1)
        return {"reference_audio": audio.strip(), "reference_text": text.strip()}
    if not REFERENCE_ID.match(value):
        raise JobError([f"{where}: {value!r} is neither a stored voice's id (letters, digits, _ or -) nor "
                        "'reference.wav|its transcript'"])
    return {"reference_id": value}


def job_from_subtitles(path: str, voices: dict[str, dict[str, Any]], speaker: str | None = None,
                       fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fishmp job (as a dict) with one segment per cue of `path`. `voices`: speaker name -> job speaker object;
    `speaker`: the speaker of cues without a name. Raises JobError naming every problem."""
    problems, segments, used = [], [], []
    for name, start, end, raw, voice in read_cues(path):
        text = _clean(raw)
        who = voice
        if who is None and (m := _PREFIX.match(_TAGS.sub("", raw))):
            who, text = m.group(1).strip(), _clean(m.group(2))
        who = who or speaker
        if not end > start:
            problems.append(f"{path}: {name} ends ({end:g} s) before it starts ({start:g} s)")
            continue
        if not text:
            continue  # a cue of markup only (a music note, a blank): nothing to say
        if who is None:
            problems.append(f"{path}: {name} names no speaker (no 'Name:' prefix) and no --speaker was given")
            continue
        if who not in used:
            used.append(who)
        segments.append({"id": f"{len(segments) + 1:04d}", "speaker": who, "text": text, "start": start, "end": end})
    missing = [w for w in used if w not in voices]
    if missing:
        problems.append(f"{path}: no voice for speaker{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}:"
                        " give --voice NAME=ID (a stored voice), --voice 'NAME=ref.wav|transcript' or --voices "
                        "FILE.json")
    if not segments and not problems:
        problems.append(f"{path}: no cues with text: nothing to synthesize")
    if problems:
        raise JobError(problems, path)
    job: dict[str, Any] = {"speakers": {w: voices[w] for w in used}, "segments": segments}
    if fit:
        job["fit"] = fit
    return job


# ---- the command (registered by fishmp/cli.py) --------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    sp = sub.add_parser("job-from-subtitles", help="write a job from an SRT or WebVTT file (one fitted line per cue)",
                        description="Write a fishmp job with one segment per cue (start/end from its timing, so each "
                        "line is fitted to its slot and placed on the film's track). The speaker is the cue's "
                        "'Name:' prefix or WebVTT voice, else --speaker.")
    sp.add_argument("subtitles", help="the .srt or .vtt file")
    sp.add_argument("-o", "--output", help="where to write the job (default: stdout)")
    sp.add_argument("--speaker", help="the speaker of cues without a name")
    sp.add_argument("--voice", action="append", default=[], metavar="NAME=VOICE",
                    help="a speaker's voice: a stored voice's id, or 'ref.wav|its transcript' (repeatable)")
    sp.add_argument("--voices", metavar="FILE", help="JSON: {NAME: {reference_audio, reference_text} or "
                    "{reference_id} or {prompt_tokens, reference_text}}; --voice entries win")
    sp.add_argument("--max-speed", type=float, help="fit: the largest speed-up (default 1.25)")
    sp.add_argument("--loudness", type=float, help="fit: the loudness target in LUFS (default -23)")
    sp.add_argument("--video-seconds", type=float, help="the film's length: the track is at least this long")


def run(args: argparse.Namespace, settings: Any = None) -> int:
    voices: dict[str, dict[str, Any]] = {}
    if args.voices:
        try:
            with open(args.voices, encoding="utf-8-sig") as f:
                voices = json.load(f)
        except (OSError, ValueError) as exc:
            raise JobError([f"{args.voices}: cannot read the voices file: {exc}"], args.voices) from None
        if not isinstance(voices, dict) or not all(isinstance(v, dict) for v in voices.values()):
            raise JobError([f"{args.voices}: must be a JSON object of speaker name -> voice object"], args.voices)
    for item in args.voice:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise JobError([f"--voice {item!r}: expected NAME=VOICE"])
        voices[name.strip()] = _voice(value.strip(), f"--voice {item!r}")
    fit = {k: v for k, v in (("max_speed", args.max_speed), ("loudness_lufs", args.loudness)) if v is not None}
    job = job_from_subtitles(args.subtitles, voices, args.speaker, fit)
    if args.video_seconds is not None:
        job["video_seconds"] = args.video_seconds
    text = json.dumps(job, indent=1, ensure_ascii=False) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"fishmp: wrote {args.output}: {len(job['segments'])} lines, speakers "
              f"{', '.join(job['speakers'])}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

