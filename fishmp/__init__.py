"""fishmp: turn "these speakers, these lines" into cloned-voice wavs with Fish Speech on every GPU you have.

Public surface (everything else is internal):
    Pool, generate      run jobs with model-loaded workers (api.py); Pool.submit -> JobHandle (.result, .cancel);
                        PoolError for a closed or unusable pool
    Settings            configuration (config.py); ConfigError for bad values
    Job, load_job       the job format (job/); JobError for invalid jobs
    JobResult           what a job produced (running/jobrun.py)
    OutputDirBusy, ManifestError, OutputDirError
                        an output directory another job holds, or a manifest.json fishmp did not write
                        (running/outputlock.py)
Importing fishmp is cheap: no torch, no NVML, no `.env`.

The package in layers, bottom to top; a module imports only its own layer and those below it, lazy imports included
(tests/test_layers.py checks it):
    1 config.py   settings                      5 worker/     the message protocol, the worker process
    2 job/        what to make (pure)           6 backends/   where workers run: local processes or Ray actors
    3 planning/   GPUs, plan, memory (pure)     7 running/    scheduler, job state, the service loop, results
    4 engines/    Fish Speech, synthetic        8 api.py, cli.py, legacy.py, demo.py, measure.py: the surfaces
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "Job", "JobError", "JobHandle", "JobResult", "ManifestError", "OutputDirBusy", "OutputDirError",
           "Pool", "PoolError", "Settings", "generate", "load_job"]


def __getattr__(name: str) -> Any:  # lazy: `import fishmp` stays light for a backend that only plans
    if name in ("Pool", "generate", "PoolError", "JobHandle"):
        from . import api

        return getattr(api, name)
    if name in ("Settings", "ConfigError"):
        from . import config

        return getattr(config, name)
    if name in ("Job", "JobError", "load_job"):
        from . import job

        return getattr(job, name)
    if name in ("OutputDirError", "OutputDirBusy", "ManifestError"):
        from .running import results

        return getattr(results, name)
    if name == "JobResult":
        from .running.jobrun import JobResult

        return JobResult
    raise AttributeError(f"module 'fishmp' has no attribute {name!r}")
