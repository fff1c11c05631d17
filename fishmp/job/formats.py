"""The three formats, parsed from Python objects: fishmp's own, the legacy generate config and the legacy encode
config. Each parser records every problem (tagged with the item it spoils) and `_settle` decides: raise them all,
or, with skip_invalid, leave the spoilt items out and keep their problems on the loaded job."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from typing import Any

from .checks import (
    JobError,
    Outputs,
    Problems,
    check_duplicate_keys,
    check_opt_path,
    is_id,
    is_int,
    max_seconds_field,
    normalize_text,
    objects,
    opt_dir,
    reference_file,
    reference_text,
    required_list,
    text_field,
    typename,
    unknown_keys,
)
from .fitting import fit_slots, parse_fit, time_fields, video_seconds_field
from .model import REFERENCE_ID, EncodeItem, EncodeJob, Job, Segment, Speaker, VoiceSource
from .params import LEGACY_PARAMS, Params, params_in, parse_params

NEW_TOP_KEYS = {"speakers", "segments", "params", "output_dir", "fit", "video_seconds"}
NEW_SPEAKER_KEYS = {"reference_audio", "prompt_tokens", "reference_text", "reference_id"}
SOURCES = ("reference_audio", "prompt_tokens", "reference_id")
NEW_SEGMENT_KEYS = {"id", "speaker", "text", "output", "params", "max_seconds", "start", "end", "fit"}


def _settle(p: Problems, skip: bool, source: str | None) -> set[Hashable | None]:
    """The tags of the items to leave out. Raises every problem unless skipping and each belongs to an item."""
    if p and (not skip or None in p.tags):
        raise JobError(p, source)
    return set(p.tags)


def _keep(segments: list[Segment], speakers: dict[str, Speaker], p: Problems, skip: bool,
          source: str | None) -> tuple[dict[str, Speaker], tuple[Segment, ...], tuple[str, ...]]:
    bad = _settle(p, skip, source)
    speakers = {k: v for k, v in speakers.items() if ("speaker", k) not in bad}
    skipped, kept = list(p), []
    for seg in segments:
        if ("item", seg.order) in bad:
            continue
        if seg.speaker not in speakers:
            skipped.append(f'segment "{seg.id}": skipped: speaker "{seg.speaker}" has a problem (above)')
            continue
        kept.append(seg)
    if not kept:
        raise JobError([*p, "nothing left to synthesize: every segment has a problem"], source)
    return speakers, tuple(kept), tuple(skipped)


def _invalid(p: Problems, ids: dict[str, int], segments: list[Segment], kept: dict[str, Speaker]) -> tuple[dict, ...]:
    """What `_keep` left out, for manifest.json's "invalid": one entry per problem, naming the segment by id (when it
    has a usable one) and by position in the file's list, or the speaker; then the segments left out for their
    speaker. `ids`: segment id -> position of its first use."""
    id_at = {i: sid for sid, i in ids.items()}
    out = []
    for message, (kind, key) in zip(p, p.tags, strict=True):  # with skip, every tag is an item's (_settle)
        where = {"speaker": key} if kind == "speaker" else {"id": id_at[key], "index": key} if key in id_at \
            else {"index": key}
        out.append({**where, "reason": message})
    bad = set(p.tags)
    out += [{"id": s.id, "index": s.order, "speaker": s.speaker,
             "reason": f'segment "{s.id}": skipped: speaker "{s.speaker}" has a problem'}
            for s in segments if ("item", s.order) not in bad and s.speaker not in kept]
    return tuple(out)


def _stored_voice(raw: dict, where: str, p: Problems, voices: VoiceSource | None) -> tuple[str, str] | None:
    """(audio path, transcript) of a speaker's `reference_id`, or None after reporting why not."""
    ref_id = raw["reference_id"]
    if not isinstance(ref_id, str) or not REFERENCE_ID.match(ref_id):
        p.add(f"{where}: reference_id must be a name of 1 to 64 letters, digits, '_' or '-', not {ref_id!r}")
    elif voices is None:
        p.add(f'{where}: reference_id "{ref_id}" names a stored voice, and there is no reference store here')
    else:
        try:
            return voices.reference(ref_id)
        except LookupError as exc:
            p.add(f"{where}: {exc.args[0] if exc.args else exc}")
    return None


def _data_url(raw: dict, where: str, p: Problems, voices: VoiceSource | None) -> dict:
    """`raw` with a data-URL reference_audio replaced by the file the voice source stored it in."""
    url = raw.get("reference_audio")
    if not (isinstance(url, str) and url.startswith("data:")):
        return raw
    if voices is None:
        p.add(f"{where}: reference_audio is a data URL, and there is no reference store here to keep it in")
        return {**raw, "reference_audio": None}
    try:
        return {**raw, "reference_audio": voices.data_url(url)}
    except ValueError as exc:
        p.add(f"{where}: reference_audio: {exc}")
        return {**raw, "reference_audio": None}


def parse_new(data: dict, base: str, out: str, p: Problems, source: str | None, skip: bool,
              voices: VoiceSource | None = None) -> Job:
    check_duplicate_keys(data, "job", p)
    unknown_keys(data, NEW_TOP_KEYS, "job", p)
    check_opt_path(data, "output_dir", "job", p)
    job_params = parse_params(data.get("params"), "job params", p)
    job_fit = parse_fit(data.get("fit"), "job", p)
    video_seconds = video_seconds_field(data, p)

    speakers: dict[str, Speaker] = {}
    raw_speakers = data.get("speakers")
    speakers_usable = isinstance(raw_speakers, dict)  # else "speaker is not defined" would only repeat the problem
    if raw_speakers is None:
        p.add('job: missing "speakers" (an object mapping speaker ids to their reference)')
        raw_speakers = {}
    elif not isinstance(raw_speakers, dict):
        p.add(f'job: "speakers" must be an object mapping speaker ids to references, not {typename(raw_speakers)}')
        raw_speakers = {}
    for sid in getattr(raw_speakers, "duplicates", ()):
        p.add(f'speaker "{sid}": defined more than once')
    for sid, raw in raw_speakers.items():
        where = f'speaker "{sid}"'
        p.item = ("speaker", sid)
        if not isinstance(sid, str) or not is_id(sid) or sid != sid.strip():
            p.add(f"speakers: invalid speaker id {sid!r} (must be non-empty, without surrounding whitespace, "
                  "control or invisible characters)")
            continue
        if not isinstance(raw, dict):
            p.add(f"{where}: must be an object with reference_text and reference_audio or prompt_tokens, "
                  f"not {typename(raw)}")
            continue
        check_duplicate_keys(raw, where, p)
        unknown_keys(raw, NEW_SPEAKER_KEYS, where, p)
        given = [k for k in SOURCES if raw.get(k) is not None]
        if given == ["reference_audio", "prompt_tokens"]:
            p.add(f"{where}: give either reference_audio or prompt_tokens, not both")
        elif len(given) > 1:
            p.add(f"{where}: give one of reference_audio, prompt_tokens or reference_id, not {' and '.join(given)}")
        elif not given:
            p.add(f"{where}: needs reference_audio (a recording of the voice, or a data: URL), prompt_tokens (a "
                  "pre-encoded .npy) or reference_id (a stored voice)")
        if given == ["reference_id"]:
            stored = _stored_voice(raw, where, p, voices)
            text = reference_text(raw, where, p) if raw.get("reference_text") is not None else \
                stored[1] if stored else None  # the stored transcript unless the job gives one
            if stored is not None and text is not None:
                speakers[sid] = Speaker(sid, text, stored[0], None, raw["reference_id"])
            continue
        raw = _data_url(raw, where, p, voices)
        audio = reference_file(raw, "reference_audio", base, where, p, required=False)
        tokens = reference_file(raw, "prompt_tokens", base, where, p, required=False, npy=True)
        text = reference_text(raw, where, p)
        if text is not None and (audio is not None) != (tokens is not None):
            speakers[sid] = Speaker(sid, text, audio, tokens)
    p.item = None
    defined = ", ".join(str(k) for k in raw_speakers) if raw_speakers else "none"

    segments: list[Segment] = []
    raw_segments = required_list(data, "segments", "job", "a list of texts to synthesize", p)
    outputs = Outputs(out, p)
    ids: dict[str, int] = {}
    for i, raw in enumerate(raw_segments):
        where = f"segments[{i}]"
        p.item = ("item", i)
        if not isinstance(raw, dict):
            p.add(f"{where}: must be an object with speaker and text, not {typename(raw)}")
            continue
        seg_id: str | None = f"{i + 1:04d}"
        duplicate_id = False
        if raw.get("id") is not None:
            if not isinstance(raw["id"], str) or not is_id(raw["id"]) or raw["id"] != raw["id"].strip():
                p.add(f"{where}: id must be a non-empty string without surrounding whitespace, control or invisible "
                      f"characters, not {raw['id']!r}")
                seg_id = None
            else:
                seg_id = raw["id"]
        if seg_id is not None:
            where = f'segment "{seg_id}"'
            if seg_id in ids:  # name the entry by its position: "segment X" alone would also name the first one
                where = f'segments[{i}] (segment "{seg_id}")'
                p.add(f"{where}: duplicate segment id: segments[{ids[seg_id]}] already has it")
                duplicate_id = True
            else:
                ids[seg_id] = i
        check_duplicate_keys(raw, where, p)
        unknown_keys(raw, NEW_SEGMENT_KEYS, where, p)
        speaker = raw.get("speaker")
        if speaker is None:
            p.add(f'{where}: missing "speaker" (speakers: {defined})')
        elif not isinstance(speaker, str):
            p.add(f"{where}: speaker must be a speaker id string, not {typename(speaker)}")
            speaker = None
        elif speaker not in raw_speakers:
            if speakers_usable:
                p.add(f'{where}: speaker "{speaker}" is not defined (speakers: {defined})')
            speaker = None
        text = text_field(raw, "text", where, p)
        params = job_params.merged(parse_params(raw.get("params"), f"{where} params", p))
        max_seconds = max_seconds_field(raw, where, p)
        start, end = time_fields(raw, where, p)
        fit = parse_fit(raw.get("fit"), where, p, job_fit)
        raw_out = raw.get("output")
        given = raw_out is not None
        if not given:
            # a duplicate id's default output would only repeat the duplicate-id problem
            raw_out = f"{seg_id}.wav" if seg_id is not None and not duplicate_id else None
        output = outputs.resolve(raw_out, where, "output", ".wav", given=given)
        if seg_id is not None and speaker is not None and text is not None and output is not None:
            segments.append(Segment(seg_id, speaker, text, output, params, i, max_seconds=max_seconds, start=start,
                                    end=end, fit=fit))
    p.item = None
    segments = _fitted(segments, outputs, p)
    if any(s.start is not None for s in segments):  # the film's track (fishmp/running/track.py) is written there
        outputs.resolve("track.wav", "job", "the film's track (written because segments have a start)", ".wav")
    outputs.check_collisions([(f'speaker "{s.id}"', "prompt_tokens" if s.prompt_tokens else "reference_audio",
                               s.reference_path) for s in speakers.values()])
    speakers, kept, skipped = _keep(segments, speakers, p, skip, source)
    return Job(speakers, kept, out, None, None, source, skipped, len(raw_segments), _invalid(p, ids, segments, speakers),
               video_seconds)


def _fitted(segments: list[Segment], outputs: Outputs, p: Problems) -> list[Segment]:
    """Each segment with its slot resolved (fit None when it is not fitted), and the raw take's file of every fitted
    one claimed among the outputs (it must not be another segment's output)."""
    slots = fit_slots([(s.max_seconds, s.start, s.end, s.fit) for s in segments])  # type: ignore[misc]
    out = []
    for seg, slot in zip(segments, slots, strict=True):
        seg = dataclasses.replace(seg, fit=seg.fit if slot is not None else None, slot=slot)
        if seg.raw_output is not None:
            p.item = ("item", seg.order)
            rel = os.path.relpath(seg.raw_output, outputs.out)
            if outputs.resolve(rel, f'segment "{seg.id}"', "output (its raw take, kept beside the fitted one)",
                               ".wav") is None:
                continue
        out.append(seg)
    p.item = None
    return out


def parse_generate(data: dict, base: str, out: str, p: Problems, source: str | None, skip: bool) -> Job:
    check_duplicate_keys(data, "config", p)
    if data.get("mode", "generate") != "generate":
        p.add(f'config: "mode" must be "generate", not {data.get("mode")!r}')
    checkpoint_dir = opt_dir(data, "checkpoint_dir", base, p)
    check_opt_path(data, "output_dir", "config", p)
    job_params = Params(**LEGACY_PARAMS).merged(params_in(data, "config", p))
    tasks = required_list(data, "tasks", "config", "a list of segments to generate", p)

    speakers: dict[str, Speaker] = {}
    first_task: dict[str, tuple[str, str | None, str | None]] = {}  # speaker id -> (task name, npy, text)
    segments: list[Segment] = []
    outputs = Outputs(out, p)
    ids: dict[str, int] = {}
    for i, where, raw in objects(tasks, "tasks", p):
        index = raw.get("segment_index")
        seg_id: str | None = None
        if not (is_int(index) and index >= 0):
            p.add(f'{where}: "segment_index" must be an integer >= 0, not {index!r}' if "segment_index" in raw
                  else f'{where}: missing "segment_index"')
        else:
            seg_id = str(index)
            where = f'segment "{seg_id}"'
            if seg_id in ids:  # name the entry by its position: "segment X" alone would also name the first one
                where = f'tasks[{i}] (segment "{seg_id}")'
                p.add(f"{where}: duplicate segment_index: tasks[{ids[seg_id]}] already has it")
            else:
                ids[seg_id] = i
        sid = _legacy_speaker(raw, i, where, base, p, speakers, first_task)
        text = text_field(raw, "target_text", where, p)
        params = job_params.merged(params_in(raw, where, p))
        output = outputs.resolve(raw.get("output_file"), where, "output_file", ".wav")
        if seg_id is not None and sid is not None and text is not None and output is not None:
            segments.append(Segment(seg_id, sid, text, output, params, i, int(seg_id)))
    outputs.check_collisions([(f'speaker "{s.id}"', "npy_file", s.prompt_tokens) for s in speakers.values()])
    speakers, kept, skipped = _keep(segments, speakers, p, skip, source)
    return Job(speakers, kept, out, checkpoint_dir, "generate", source, skipped, len(tasks),
               _invalid(p, ids, segments, speakers))


def _legacy_speaker(raw: dict, i: int, where: str, base: str, p: Problems, speakers: dict[str, Speaker],
                    first_task: dict[str, tuple[str, str | None, str | None]]) -> str | None:
    """A legacy task's speaker id. Its first task defines the speaker (problems there spoil the speaker, so every
    task of it); later tasks must agree (a disagreement spoils that task only)."""
    sid_raw = raw.get("speaker_id")
    if not is_id(sid_raw):
        p.add(f'{where}: "speaker_id" must be an integer or a non-empty string, not {sid_raw!r}'
              if "speaker_id" in raw else f'{where}: missing "speaker_id"')
        return None
    sid = str(sid_raw)
    swhere = f'speaker "{sid}"'
    if sid not in first_task:
        p.item = ("speaker", sid)
        npy = reference_file(raw, "npy_file", base, f"{swhere} ({where})", p, required=True, npy=True)
        rtext = reference_text(raw, f"{swhere} ({where})", p)
        p.item = ("item", i)
        first_task[sid] = (where, npy, rtext)
        if npy is not None and rtext is not None:
            speakers[sid] = Speaker(sid, rtext, None, npy)
    elif sid in speakers:
        first_where, npy0, text0 = first_task[sid]
        npy_raw, text_raw = raw.get("npy_file"), raw.get("reference_text")
        npy = os.path.abspath(os.path.join(base, npy_raw)) if isinstance(npy_raw, str) else npy_raw
        rtext = normalize_text(text_raw) if isinstance(text_raw, str) else text_raw
        if npy != npy0:
            p.add(f"{swhere}: {where} uses npy_file {npy_raw!r} but {first_where} uses {npy0} for the same speaker_id")
        if rtext != text0:
            p.add(f"{swhere}: {where} has a different reference_text than {first_where} "
                  f"for the same speaker_id ({rtext!r} vs {text0!r})")
    return sid


def parse_encode(data: Any, base: str, out: str, p: Problems, source: str | None, skip: bool) -> EncodeJob:
    if not isinstance(data, dict):
        p.add(f"an encode config must be a JSON object, not {typename(data)}")
        raise JobError(p, source)
    check_duplicate_keys(data, "config", p)
    if data.get("mode", "encode") != "encode":
        p.add(f'"mode" must be "encode", not {data.get("mode")!r}')
    checkpoint_dir = opt_dir(data, "checkpoint_dir", base, p)
    check_opt_path(data, "output_dir", "config", p)
    speakers = data.get("speakers")
    items: list[tuple[int, EncodeItem]] = []
    if speakers is None:
        p.add('config: missing "speakers" (a list of speakers to encode)')
    elif not isinstance(speakers, list):
        p.add(f'config: "speakers" must be a list, not {typename(speakers)}')
    elif not speakers:
        p.add('config: "speakers" is empty: nothing to encode')
    else:
        seen: dict[str, int] = {}
        outputs = Outputs(out, p)
        for i, where, raw in objects(speakers, "speakers", p):
            sid = raw.get("speaker_id")
            if not is_id(sid):
                p.add(f'{where}: "speaker_id" must be an integer or a non-empty string, not {sid!r}'
                      if "speaker_id" in raw else f'{where}: missing "speaker_id"')
                sid = None
            else:
                where = f'speaker "{sid}"'
                if str(sid) in seen:  # name the entry by its position: 'speaker "1"' would also name the first one
                    where = f'speakers[{i}] (speaker "{sid}")'
                    p.add(f"{where}: duplicate speaker_id: speakers[{seen[str(sid)]}] already defines it")
                else:
                    seen[str(sid)] = i
            audio = reference_file(raw, "reference_audio", base, where, p, required=True)
            text = reference_text(raw, where, p)
            default = f"speaker_{sid}.npy" if sid is not None else None
            output = outputs.resolve(raw.get("output_npy", default), where, "output_npy", ".npy",
                                     given="output_npy" in raw and raw["output_npy"] is not None)
            if sid is not None and audio and text and output:
                items.append((i, EncodeItem(sid, audio, text, output)))
        outputs.check_collisions([(f'speaker "{it.speaker_id}"', "reference_audio", it.reference_audio)
                                  for _, it in items])
    bad = _settle(p, skip, source)
    kept = tuple(it for i, it in items if ("item", i) not in bad)
    if not kept:
        raise JobError([*p, "nothing left to encode: every speaker has a problem"], source)
    return EncodeJob(kept, out, checkpoint_dir, source, "encode", tuple(p), len(speakers))
