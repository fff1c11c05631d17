"""Layer 2, the job: what to synthesize, in whose voice, and where to write it. Pure: no processes, no torch.
May import: fishmp.config (nothing else of fishmp).

Three input formats are read:

* fishmp's own (``{"speakers": {...}, "segments": [...], "params": {...}}``),
* the legacy generate config that dubbing backends write (``{"mode": "generate", "tasks": [...]}``),
* the legacy encode config (``{"mode": "encode", "speakers": [...]}``), which has no segments and loads as an
  `EncodeJob` (`load_encode_config`; `load_config` dispatches on the format).

Modules, bottom to top: `checks` (Problems, JobError, field checks, text, the output guarantee), `params` (sampling
parameters and their ranges), `fitting` (start/end, slots and the fit's settings and policy), `model` (dataclasses,
fingerprints), `formats` (one parser per format), `load` (files and entry points), `schema` (JSON Schema of fishmp's
format), `subtitles` (SRT/WebVTT to a job: `fishmp job-from-subtitles`).
Parsing collects every problem and raises one `JobError` listing them all, each naming its item; with
`skip_invalid` the items that have a problem are left out instead (their problems kept in `Job.skipped`). Every
output path in a loaded job is absolute and resolves to a file strictly inside the output directory. Writers should
still replace files atomically (temp file + ``os.replace``) so a symlink planted after loading is replaced, not
followed.
"""

from .checks import JobError, normalize_text
from .load import (
    default_output_dir,
    detect_format,
    encode_job_from_dict,
    job_from_dict,
    load_config,
    load_encode_config,
    load_job,
    output_dir_escape,
)
from .model import (
    EncodeItem,
    EncodeJob,
    Job,
    Segment,
    Speaker,
    reference_fingerprint,
    segment_fingerprint,
)
from .params import LEGACY_PARAMS, MAX_NEW_TOKENS_LIMIT, MAX_SEED, PARAM_KEYS, Params

__all__ = [
    "LEGACY_PARAMS",
    "MAX_NEW_TOKENS_LIMIT",
    "MAX_SEED",
    "PARAM_KEYS",
    "EncodeItem",
    "EncodeJob",
    "Job",
    "JobError",
    "Params",
    "Segment",
    "Speaker",
    "default_output_dir",
    "detect_format",
    "encode_job_from_dict",
    "job_from_dict",
    "load_config",
    "load_encode_config",
    "load_job",
    "normalize_text",
    "output_dir_escape",
    "reference_fingerprint",
    "segment_fingerprint",
]
