"""fishmp.job: segment and reference fingerprints (what resume and the reference cache key on).
Pure and fast: real files in tmp_path, no engine."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from job_files import (
    new_job,
    one_problem,
    write_job,
    write_npy,
    write_wav,
)

from fishmp.job import (
    Params,
    Segment,
    Speaker,
    job_from_dict,
    load_job,
    reference_fingerprint,
    segment_fingerprint,
)

# ------------------------------------------------------------------------------------------------ fingerprints


def _segment(text: str = "Hello.", params: Params | None = None, **kw) -> Segment:
    params = Params(temperature=0.7) if params is None else params
    fields = {"id": "0001", "speaker": "alice", "text": text, "output": "/o/0001.wav", "params": params, "order": 0}
    fields.update(kw)
    return Segment(**fields)


def test_segment_fingerprint_changes_only_with_what_shapes_the_audio() -> None:
    base = segment_fingerprint(_segment(), "spk", "eng")
    assert len(base) == 64 and int(base, 16) >= 0
    assert segment_fingerprint(_segment(), "spk", "eng") == base
    # unchanged: id, order, output path, speaker id (the voice is the speaker fingerprint), legacy index
    assert segment_fingerprint(_segment(id="x", order=5, output="/p/q.wav", speaker="bob", legacy_index=3),
                               "spk", "eng") == base
    changed = [
        segment_fingerprint(_segment(text="Hello!"), "spk", "eng"),
        segment_fingerprint(_segment(params=Params(temperature=0.8)), "spk", "eng"),
        segment_fingerprint(_segment(params=Params(temperature=0.7, seed=1)), "spk", "eng"),
        segment_fingerprint(_segment(params=Params()), "spk", "eng"),
        segment_fingerprint(_segment(), "spk2", "eng"),
        segment_fingerprint(_segment(), "spk", "eng2"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_segment_fingerprint_stable_across_equivalent_job_files(proj: Path) -> None:
    a = new_job()
    b = copy.deepcopy(a)
    b["params"] = {"top_p": 0.8, "temperature": 0.7}  # same values, other key order
    b["segments"][0]["text"] = " First line.\n"  # normalises to the same text
    b["segments"][0]["output"] = "renamed.wav"
    ja = load_job(str(write_job(proj, a, "a.json")), str(proj / "o"))
    jb = load_job(str(write_job(proj, b, "b.json")), str(proj / "o"))
    fa = [segment_fingerprint(s, reference_fingerprint(ja.speakers[s.speaker]), "e") for s in ja.segments]
    fb = [segment_fingerprint(s, reference_fingerprint(jb.speakers[s.speaker]), "e") for s in jb.segments]
    assert fa == fb


def test_integer_and_float_params_fingerprint_the_same(proj: Path) -> None:
    a, b = new_job(), new_job()
    a["params"]["temperature"], b["params"]["temperature"] = 1, 1.0
    ja = job_from_dict(a, str(proj), str(proj / "o"))
    jb = job_from_dict(b, str(proj), str(proj / "o"))
    assert segment_fingerprint(ja.segments[0], "s", "e") == segment_fingerprint(jb.segments[0], "s", "e")


def test_reference_fingerprint(proj: Path) -> None:
    audio = str(proj / "refs" / "alice.wav")
    tokens = str(proj / "refs" / "bob.npy")
    base = reference_fingerprint(Speaker("alice", "Hello.", reference_audio=audio))
    assert len(base) == 64
    # the id does not matter, only the reference itself
    assert reference_fingerprint(Speaker("someone", "Hello.", reference_audio=audio)) == base
    # an identical copy of the file elsewhere is the same voice
    copy_path = proj / "copy.wav"
    copy_path.write_bytes(Path(audio).read_bytes())
    assert reference_fingerprint(Speaker("alice", "Hello.", reference_audio=str(copy_path))) == base
    assert reference_fingerprint(Speaker("alice", "Hello!", reference_audio=audio)) != base
    tok = reference_fingerprint(Speaker("alice", "Hello.", prompt_tokens=tokens))
    assert tok != base
    write_wav(Path(audio), freq=440.0)  # the file's content changed
    assert reference_fingerprint(Speaker("alice", "Hello.", reference_audio=audio)) != base
    write_npy(Path(tokens), seed=99)
    assert reference_fingerprint(Speaker("alice", "Hello.", prompt_tokens=tokens)) != tok
    with pytest.raises(OSError):
        reference_fingerprint(Speaker("alice", "Hello.", reference_audio=str(proj / "gone.wav")))


def test_npy_prompt_tokens_shape_checked(proj: Path) -> None:
    np.save(proj / "refs" / "flat.npy", np.zeros(10, dtype=np.int64))
    np.save(proj / "refs" / "floats.npy", np.zeros((10, 5), dtype=np.float32))
    for name in ("flat.npy", "floats.npy"):
        data = new_job()
        data["speakers"]["bob"]["prompt_tokens"] = f"refs/{name}"
        one_problem(proj, data, 'speaker "bob": prompt_tokens', "2-D integer array")
