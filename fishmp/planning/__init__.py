"""Layer 3, planning: GPU inventory, the plan, the memory estimate, `plan --explain`, checkpoint identity (pure).
May import: fishmp.config, fishmp.job. No processes, no torch: the main process plans before any worker exists.

Modules: `gpus` (NVML inventory, CUDA_VISIBLE_DEVICES, --gpus), `plan` (workers x rows per GPU), `memory` (the
per-worker estimate from the checkpoint's files), `explain` (`plan --explain`), `checkpoint` (a checkpoint's content
fingerprint), `warmup` (the warm-up segment measurements run), `throughput` (frames/s that `plan --measure` kept).
"""
