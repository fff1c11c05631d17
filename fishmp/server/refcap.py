"""How long a reference this server takes: FISH_SERVE_MAX_REFERENCE_S, or the checkpoint codec's own limit when that
is shorter. A longer reference would be accepted (202) and only fail in a worker (engines/fish.py refuses what its
codec's transformers cannot hold), so the server judges it from the audio's header at once instead.

The codec's limit is read from its config, without torch: each codec transformer holds `block_size` steps; the
encoder's run one step per `hop` samples (the product of `encoder_rates`), the quantizer's pre and post modules one
per frame (`hop` x the product of its `downsample_factor`), as engines/fish.py computes it from the loaded codec."""

from __future__ import annotations

import math
from typing import Any

from ..planning.memory import CheckpointReadError, codec_config


def codec_limit_s(checkpoint_dir: str) -> float | None:
    """The longest reference (seconds) this checkpoint's codec can encode; None when its config cannot be read."""
    try:
        cfg = codec_config(checkpoint_dir)
        hop = math.prod(int(r) for r in cfg["encoder_rates"])
        quantizer = cfg.get("quantizer") or {}
        frame = hop * math.prod(int(d) for d in quantizer.get("downsample_factor", (2, 2)))
        steps = [int(cfg["transformer_general_config"]["block_size"]) * hop
                 for n in cfg.get("encoder_transformer_layers", []) if n > 0]
        steps += [int(quantizer[part]["config"]["block_size"]) * frame
                  for part in ("pre_module", "post_module") if quantizer.get(part)]
        return min(steps) / float(cfg["sample_rate"]) if steps else None
    except (CheckpointReadError, OSError, ValueError, KeyError, TypeError):
        return None


def reference_cap_s(settings: Any, serve_cap_s: float) -> float:
    if getattr(settings, "engine", "fish") != "fish":
        return serve_cap_s
    codec = codec_limit_s(str(settings.checkpoint_dir))
    return serve_cap_s if codec is None else min(serve_cap_s, math.floor(codec * 10) / 10)
