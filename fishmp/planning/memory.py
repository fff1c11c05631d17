"""An estimate of one worker's GPU memory, read from the checkpoint itself. No torch: the main process plans with it.

Tensor shapes and dtypes come from model.pth and codec.pth without loading them: a torch .pth file is a zip archive
whose data.pkl describes every tensor (storage dtype and size, shape); a restricted Unpickler records those and
never builds a tensor or runs any other code. config.json gives the LLM's shape; the codec's unstored buffers (RoPE
tables, causal masks) follow from fish-speech's packaged yaml (plus the checkpoint's codec_overrides.json).

What one worker holds (fishmp.engines.fish loads it so):
  LLM weights        every model.pth tensor at FISH_PRECISION (the engine casts them on load)
  LLM buffers        causal mask (L x L bool) + RoPE table (L x head_dim) at the precision, L = max_seq_len
  KV cache           layers x 2 (K and V) x kv heads x head dim x L (rounded up to 8) x bytes x rows,
                     plus the fast transformer's (num_codebooks positions)
  prefix cache       speakers' prompt prefixes kept prefilled (fishmp.engines.prefix_cache): at most
                     PREFIX_CACHE_ROWS x L tokens of slow-layer KV, whatever the batch size
  codec weights      every codec.pth tensor in float32 (the engine keeps the codec float32 under autocast)
  codec buffers      per codec transformer: block x block bool mask + block x head_dim float32 RoPE table
  activations        codec encode of the longest reference + the larger of LLM prefill and codec decode of the
                     longest output: torch's caching allocator keeps each phase's blocks, so the phases add up
  CUDA context       per process, fixed (driver, torch, cuBLAS/cuDNN kernels); not seen by torch's own counters
  allocator slack    rounding and fragmentation of the cached activation blocks
  safety margin      a fraction of all the above
The first five are exact (the tests compare them with fish-speech's modules). Activation, context and slack
coefficients were calibrated on an NVIDIA H200 (torch 2.11 + CUDA 13, S1-mini-sized random checkpoint, bf16): peak
allocations of the engine's encode (10 s and 30 s references) and decode (64, 256 and 1024 frames) and the NVML drop
of a whole worker; `python -m fishmp plan --measure` checks them on any GPU (README).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}
_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                   "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "ComplexFloatStorage": "complex64"}
GENERATION_RESERVE = 2048  # fish-speech refuses prompts of max_seq_len - 2048 tokens or more

# Calibration (module docstring; H200 peaks in brackets): tensors of (samples x channels) alive at once at the peak,
# for the decoder's last stage (96 channels at 44.1 kHz: 10.04 per 1024-frame slope, + 34 MiB fixed; 64 frames 288 MB,
# 256 frames 1.05 GB, 1024 frames 4.08 GB) and the encoder's first (64 channels: 10 s 571 MB, 30 s 1.75 GB = 10.1-10.3);
# the CUDA context after cuBLAS/cuDNN loaded (733 MB); the activations' allocator slack; the safety margin.
DECODE_LIVE_TENSORS = 10.05
DECODE_FIXED_BYTES = 34 * 1024**2
ENCODE_LIVE_TENSORS = 10.3
CUDA_CONTEXT_BYTES = 700 * 1024**2
ALLOCATOR_SLACK = 0.10
SAFETY_MARGIN = 0.10
# The speaker-prefix KV a worker keeps (fishmp.engines.prefix_cache), in KV rows of max_seq_len tokens: one row
# holds several speakers' prompts (a 30 s reference is ~750 tokens), so rows of many voices start without a prefill
# each, for the memory of one more batch row.
PREFIX_CACHE_ROWS = 1


class CheckpointReadError(ValueError):
    """A checkpoint file is missing or not a torch zip archive fishmp can read; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    storage: str  # the archive's storage key: tied tensors share one

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], *args: Any) -> TensorInfo:
    return TensorInfo(tuple(int(s) for s in size), storage.dtype, storage.key)


def _rebuild_parameter(data: Any, *args: Any) -> Any:
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """Reads a torch state dict's data.pkl into {name: TensorInfo}; any class outside a small allow-list is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in DTYPE_BYTES:  # torch.storage.TypedStorage pickles name the dtype
            return name
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a state dict")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type (a dtype name here), key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return _Storage(str(pid[2]), str(pid[1]))


def read_tensor_shapes(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a torch-saved state dict (nested dicts flattened with '.'), read without torch."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise CheckpointReadError(f"{path}: no data.pkl inside (not a torch zip checkpoint)")
            obj = _ShapeUnpickler(zf.open(pkl)).load()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointReadError(f"{path}: cannot read as a torch zip checkpoint ({exc})") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointReadError(f"{path}: unsupported content ({exc})") from None
    out: dict[str, TensorInfo] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, TensorInfo):
            out[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    return out


def _unique_numel(tensors: dict[str, TensorInfo], floating: bool | None = None) -> int:
    """Elements held once per storage (tied weights count once); `floating` filters by dtype kind."""
    seen: dict[str, int] = {}
    for t in tensors.values():
        is_float = t.dtype.startswith(("float", "bfloat"))
        if floating is None or is_float == floating:
            seen[t.storage] = max(seen.get(t.storage, 0), t.numel)
    return sum(seen.values())


def _codec_tensors(path: str) -> dict[str, TensorInfo]:
    tensors = read_tensor_shapes(path)
    tensors = {k.removeprefix("state_dict."): v for k, v in tensors.items()}
    if any(k.startswith("generator.") for k in tensors):  # a training checkpoint: the engine keeps the generator
        tensors = {k: v for k, v in tensors.items() if k.startswith("generator.")}
    return {k: v for k, v in tensors.items() if not k.endswith(("causal_mask", "freqs_cis"))}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def codec_config(checkpoint_dir: str) -> dict[str, Any]:
    """fish-speech's packaged modded_dac_vq.yaml merged with the checkpoint's codec_overrides.json (as the engine)."""
    import yaml

    spec = importlib.util.find_spec("fish_speech")  # locates the package without importing it (or torch)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointReadError("fish-speech is not installed: the codec's shape comes from its packaged yaml")
    with open(os.path.join(list(spec.submodule_search_locations)[0], "configs", "modded_dac_vq.yaml")) as f:
        cfg = yaml.safe_load(f)
    overrides = os.path.join(checkpoint_dir, "codec_overrides.json")
    if os.path.isfile(overrides):
        with open(overrides) as f:
            cfg = _merge(cfg, json.load(f))
    return cfg


def codec_transformers(cfg: dict[str, Any]) -> list[tuple[int, int]]:
    """(block_size, head_dim) of every transformer the codec builds: one per encoder block with layers, and the
    quantizer's pre and post modules (modded_dac's decoder blocks build none: their transformer is commented out)."""
    general = cfg.get("transformer_general_config", {})
    out = [(int(general["block_size"]), int(general.get("head_dim", 64)))
           for n in cfg.get("encoder_transformer_layers", []) if n > 0]
    for part in ("pre_module", "post_module"):
        module = (cfg.get("quantizer") or {}).get(part)
        if module:
            c = module["config"]
            out.append((int(c["block_size"]), int(c.get("head_dim") or c["dim"] // c["n_head"])))
    return out


@dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    how: str  # how it was computed, with the numbers


@dataclass(frozen=True)
class Estimate:
    lines: tuple[Line, ...]
    kv_row_bytes: int  # what one more batch row costs (its KV caches)
    max_seq_len: int
    precision: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def component(self, name: str) -> int:
        return next(line.bytes for line in self.lines if line.name == name)

    def with_rows(self, rows: int) -> int:
        """Bytes of one worker decoding `rows` sequences at once: each row past the first adds its KV cache."""
        return self.total_bytes + (rows - self.details.get("rows", 1)) * self.kv_row_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "total_gib": round(self.total_gib, 3), "precision": self.precision,
                "max_seq_len": self.max_seq_len, "kv_row_bytes": self.kv_row_bytes,
                "components": [{"name": x.name, "bytes": x.bytes, "gib": round(x.bytes / GIB, 3), "how": x.how}
                               for x in self.lines], **self.details}


@dataclass(frozen=True)
class Workload:
    """The longest work a worker does, which sizes the activations: reference seconds, prompt tokens, output frames."""

    reference_s: float = 30.0
    prompt_tokens: int | None = None  # None: the most max_seq_len allows (max_seq_len - 2048)
    new_tokens: int = 1024  # fish-speech's max_new_tokens default in fishmp


def _fmt(n: int) -> str:
    return f"{n:,}"


def estimate(checkpoint_dir: str, precision: str = "bfloat16", max_seq_len: int | None = None, rows: int = 1,
             workload: Workload | None = None) -> Estimate:
    """One worker's GPU memory, component by component. Raises CheckpointReadError naming a missing/bad file."""
    work = workload or Workload()
    cfg_path = os.path.join(checkpoint_dir, "config.json")
    for name in ("config.json", "model.pth", "codec.pth"):
        if not os.path.isfile(os.path.join(checkpoint_dir, name)):
            raise CheckpointReadError(f"checkpoint {checkpoint_dir!r} lacks {name} (FISH_CHECKPOINT_DIR)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointReadError(f"{cfg_path}: not readable JSON ({exc})") from None
    pb = DTYPE_BYTES[precision]
    missing = [k for k in ("n_layer", "n_head", "dim") if not isinstance(cfg.get(k), int)]
    if missing:
        raise CheckpointReadError(f"{cfg_path}: no whole-number {', '.join(missing)} (not a Fish Speech config)")
    n_layer, n_head, dim = cfg["n_layer"], cfg["n_head"], cfg["dim"]
    kv_heads = int(cfg.get("n_local_heads", -1))
    kv_heads = n_head if kv_heads == -1 else kv_heads
    head_dim = int(cfg.get("head_dim") or dim // n_head)
    n_fast = int(cfg.get("n_fast_layer", 4))
    fast_kv = int(cfg.get("fast_n_local_heads") or kv_heads)
    fast_hd = int(cfg.get("fast_head_dim") or head_dim)
    codebooks = int(cfg.get("num_codebooks", 10))
    ckpt_len = int(cfg.get("max_seq_len", 2048))
    seq = min(ckpt_len, max_seq_len or ckpt_len)
    cache_len = -(-seq // 8) * 8  # setup_caches rounds up to a multiple of 8

    llm = read_tensor_shapes(os.path.join(checkpoint_dir, "model.pth"))
    llm = {k.removeprefix("state_dict.").removeprefix("model."): v for k, v in llm.items()}
    llm_params = _unique_numel(llm)
    codec = _codec_tensors(os.path.join(checkpoint_dir, "codec.pth"))
    codec_float = _unique_numel(codec, True)
    codec_other = sum({t.storage: t.numel * DTYPE_BYTES.get(t.dtype, 4) for t in codec.values()
                       if not t.dtype.startswith(("float", "bfloat"))}.values())
    ccfg = codec_config(checkpoint_dir)
    transformers = codec_transformers(ccfg)

    kv_row = n_layer * 2 * kv_heads * cache_len * head_dim * pb
    fast_row = n_fast * 2 * codebooks * fast_kv * fast_hd * pb
    llm_buffers = seq * seq + seq * head_dim * pb + codebooks * fast_hd * pb
    codec_buffers = sum(b * b + b * hd * 4 for b, hd in transformers)

    # Activations: encode, prefill and decode run one after another, but the caching allocator keeps what the encode
    # reserved when decoding starts (blocks of other sizes): encode + the larger of the two others (H200-calibrated).
    act_bytes = pb  # codec convolutions run in the autocast dtype (float32 stays float32)
    sample_rate = int(ccfg.get("sample_rate", 44100))
    hop = math.prod(ccfg.get("encoder_rates", [2, 4, 8, 8]))
    frame = hop * math.prod((ccfg.get("quantizer") or {}).get("downsample_factor", [2, 2]))
    max_frames = min((b for b, _ in transformers[-2:]), default=10**9) if ccfg.get("quantizer") else 10**9
    frames = min(work.new_tokens, max_frames)
    last_channels = int(ccfg.get("decoder_dim", 1536)) // 2 ** len(ccfg.get("decoder_rates", [8, 8, 4, 2]))
    decode = DECODE_FIXED_BYTES + round(DECODE_LIVE_TENSORS * frames * frame * last_channels * act_bytes)
    ref_samples = int(work.reference_s * sample_rate)
    encode = round(ENCODE_LIVE_TENSORS * ref_samples * int(ccfg.get("encoder_dim", 64)) * act_bytes)
    prompt = max(1, min(work.prompt_tokens or seq, seq - GENERATION_RESERVE))
    inter = int(cfg.get("intermediate_size") or 4 * dim)
    vocab = int(cfg.get("vocab_size", 32000))
    prefill = (2 * n_head * cache_len * head_dim * pb  # K and V repeated to every head, one layer at a time
               + prompt * cache_len * pb  # the boolean mask as an additive bias for the attention kernel
               + prompt * (4 * dim + 3 * inter) * pb  # hidden states, q/k/v, MLP
               + vocab * 4 * 2)  # last-position logits and probabilities in float32
    later = max(decode, prefill)

    lines = [
        Line("LLM weights", llm_params * pb,
             f"{_fmt(llm_params)} parameters in model.pth x {pb} bytes ({precision})"),
        Line("LLM buffers", llm_buffers,
             f"causal mask {seq}x{seq} bool + RoPE table {seq}x{head_dim} x {pb} bytes"),
        Line("KV cache", (kv_row + fast_row) * rows,
             f"{n_layer} layers x 2 x {kv_heads} kv heads x {head_dim} head dim x {cache_len} tokens x {pb} bytes"
             f" x {rows} row(s) (+ fast layers {n_fast} x 2 x {codebooks} x {fast_kv} x {fast_hd} x {pb})"),
        Line("prefix cache", PREFIX_CACHE_ROWS * n_layer * 2 * kv_heads * seq * head_dim * pb,
             f"speaker prefixes kept prefilled: at most {PREFIX_CACHE_ROWS} x {seq} tokens x {n_layer} layers x 2 x "
             f"{kv_heads} kv heads x {head_dim} head dim x {pb} bytes"),
        Line("codec weights", codec_float * 4 + codec_other,
             f"{_fmt(codec_float)} parameters in codec.pth x 4 bytes (float32, as the engine loads it)"),
        Line("codec buffers", codec_buffers,
             " + ".join(f"{b}x{b} mask + {b}x{hd} x 4 RoPE" for b, hd in transformers) or "none"),
        Line("activations", encode + later,
             f"codec encode of a {work.reference_s:g} s reference {_fmt(encode)} + the larger of codec decode of "
             f"{frames} frames ({frames * frame / sample_rate:.1f} s of audio) {_fmt(decode)} and LLM prefill of "
             f"{prompt} tokens {_fmt(prefill)}"),
        Line("CUDA context", CUDA_CONTEXT_BYTES, "per process: driver, torch, cuBLAS/cuDNN (733 MB on an H200)"),
        Line("allocator slack", round(ALLOCATOR_SLACK * (encode + later)),
             f"{ALLOCATOR_SLACK:.0%} of the activations (cached blocks of different sizes)"),
    ]
    subtotal = sum(x.bytes for x in lines)
    lines.append(Line("safety margin", round(SAFETY_MARGIN * subtotal), f"{SAFETY_MARGIN:.0%} of {subtotal / GIB:.2f} GB"))
    details = {"llm_parameters": llm_params, "codec_parameters": codec_float, "rows": rows,
               "workload": {"reference_s": work.reference_s, "prompt_tokens": prompt, "new_tokens": frames}}
    return Estimate(tuple(lines), kv_row + fast_row, seq, precision, details)
