"""Layer 5, the worker: the message protocol and the process that loads an engine once and runs segments.
May import: fishmp.config, fishmp.job, fishmp.planning, fishmp.engines.

Modules: `protocol` (the frozen messages both sides exchange), `process` (the worker's entry point: load, reader
and writer threads), `lanes` (its generation loop: batch sessions, refill, faults), `takes` (the take check, pure),
`recycle` (when a worker leaves to be replaced), `references` (the encoded-reference cache), `footprint`
(FISH_MODEL_MEMORY_GB=auto's self-measurement), `files` (atomic writes and fishmp's temp names).
"""
