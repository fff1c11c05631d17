"""Layer 7, running jobs: the scheduler, per-job state, the service loop, deadlines, results, progress, telemetry.
May import: every layer below (config, job, planning, engines, worker, backends); never the surfaces above.

Modules: `scheduler` (who runs what next, pure), `jobrun` (one job's state, its manifest, events and result;
JobHandle), `service` (the loop driving the workers for every running job), `watchdog` (deadlines: loads, segments, starts),
`autofill` (FISH_MODEL_MEMORY_GB=auto grows the pool), `results` (manifest.json), `outputlock` (one job per output
directory), `progress` (events and their renderers), `delivery` (each job's events to its callback, off the loop's thread),
`telemetry` (NVML samples per job), `review` (retakes and accepts: the records and files they change), `amend` (edits to a
job's manifest from outside its run).
"""
