"""The Fish Speech engine (OpenAudio S1 / S1-mini) on fish-speech 0.1.0's low-level API.

- LLM: `DualARTransformer.from_pretrained(dir, load_weights=True, max_length=...)`, then to device/dtype as
  `fish_speech.models.text2semantic.inference.init_model` does. init_model itself has no max_length argument: it
  would build the causal mask and allocate the KV cache for the checkpoint's full max_seq_len (8192 on S1-mini)
  before we could lower it. fish-speech's own KV cache is not allocated at load: every segment decodes in a batch
  session (fishmp.engines.batched, its own cache), and `synthesize_upstream` (fish-speech's generate_long, the
  oracle of tests and the benchmarks' baseline) lets generate() allocate it on first use.
  `settings.max_seq_len` only ever lowers the checkpoint's value (RoPE was trained up to it); it must leave room for
  fish-speech's own rule that the prompt be shorter than max_seq_len - 2048.
- Precision: on CUDA `settings.precision` is used for the LLM, and the codec runs float32 weights under autocast to
  that dtype (what fish_speech.inference_engine does). On CPU everything runs float32 whatever the setting: CPU
  bfloat16 matmuls without AMX are several times slower here, float16 is worse (see the report / tests).
- Codec: built from the packaged `fish_speech/configs/modded_dac_vq.yaml` with OmegaConf + hydra.utils.instantiate and
  `load_state_dict(strict=False, assign=True)` — not `fish_speech.models.dac.inference.load_model`, which needs
  pyrootutils (loads a `.env`, sets PROJECT_ROOT), clears the global Hydra instance and imports lightning.
  fishmp extension: an optional `codec_overrides.json` in the checkpoint dir is merged over the yaml (only the tiny
  test checkpoints of fishmp.engines.tiny write one; real checkpoints use the yaml exactly).
- Side effects of importing fish_speech are contained in `import_fish_speech()`: environment variables it sets are
  restored, the per-token tqdm bar is replaced by a plain iterator, loguru's "fish_speech" logger is disabled.
  Nothing is written to the cwd and no `.env` is read.
- `synthesize` is a batch session of one row: the same session and sampler as every batch size
  (fishmp.engines.sampling: counter-based noise, a pure function of seed, chunk, frame and codebook), so the batch
  size never changes a segment's audio. `synthesize_upstream` is fish-speech's own path: its sampling draws from
  the GLOBAL torch RNG (`torch.empty_like(p).exponential_()`), so with `params.seed` set each text chunk seeds torch
  with seed + chunk index inside `torch.random.fork_rng`, which restores the global RNG state afterwards.
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..planning.checkpoint import checkpoint_fingerprint
from .audio import read_reference
from .base import (
    Audio,
    BadReferenceError,
    EngineError,
    SpeakerPrompt,
    SynthesisParams,
)
from .fish_common import (
    CODEC_OVERRIDES_FILE,
    GENERATION_RESERVE,
    build_codec,
    check_params,
    encode_inline,
    guard_oom,
    import_fish_speech,
    split_text,
)

REQUIRED_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "codec.pth")



class FishSpeechEngine:
    """Fish Speech voice cloning in one process on one device ('cpu' or 'cuda:N')."""

    name = "fish"

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.sample_rate = 44100  # the packaged codec's; replaced by the loaded codec's in load()
        self.max_seq_len = 0
        # The codec's transformers index RoPE tables of `block_size` positions: longer inputs crash (IndexError, or a
        # device-side assert on CUDA), so references and generated chunks are bounded up front (set in load()).
        self.max_reference_s = 0.0
        self.max_frames = 0
        self._model: Any = None
        self._decode_one: Any = None
        self._codec: Any = None
        self._dtype: Any = None
        self._prompt_key: str | None = None
        self._prompt: tuple[Any, str] | None = None  # (tokens tensor (10, T) long on CPU, transcript) for _prompt_key
        self._fingerprint: str | None = None
        self._compiled_batch: Any = None  # FISH_COMPILE with batching: see compiled_batch()
        self.prefixes: Any = None  # speaker prefixes' KV (prefix_cache.PrefixCache), made in load()
        self._threads = 1  # torch's thread count when loaded, for threads beside the decode loop (beside())
        self._side_stream: Any = None  # beside()'s CUDA stream

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self) -> None:
        ckpt = self.settings.checkpoint_dir
        missing = [n for n in REQUIRED_FILES if not os.path.isfile(os.path.join(ckpt, n))]
        if missing:
            raise EngineError(f"checkpoint directory {ckpt} lacks {', '.join(missing)} (FISH_CHECKPOINT_DIR)")
        fish = import_fish_speech()
        import torch

        on_cuda = self.device.startswith("cuda")
        self._threads = torch.get_num_threads()
        self._dtype = getattr(torch, self.settings.precision) if on_cuda else torch.float32
        try:
            config = fish["BaseModelArgs"].from_pretrained(ckpt)
        except Exception as exc:  # unknown keys raise TypeError, a bad model_type ValueError
            raise EngineError(f"cannot read {ckpt}/config.json: {exc}") from exc
        requested = self.settings.max_seq_len if isinstance(self.settings.max_seq_len, int) else None  # "auto": api
        max_len = min(config.max_seq_len, requested or config.max_seq_len)
        if max_len <= GENERATION_RESERVE + 64:
            raise EngineError(f"max_seq_len {max_len} leaves no room for a prompt: fish-speech needs the prompt "
                              f"shorter than max_seq_len - {GENERATION_RESERVE} (FISH_MAX_SEQ_LEN)")

        def load_all() -> None:
            # As init_model, but with max_length so the causal mask and KV cache are built at the lowered length.
            model = fish["DualARTransformer"].from_pretrained(ckpt, load_weights=True, max_length=max_len)
            model = model.to(device=self.device, dtype=self._dtype).eval()
            encode_inline(model.tokenizer)
            decode_one = fish["inference"].decode_one_token_ar  # synthesize_upstream's (benchmarks may compile it)
            overrides_path = os.path.join(ckpt, CODEC_OVERRIDES_FILE)
            overrides = json.loads(Path(overrides_path).read_text()) if os.path.isfile(overrides_path) else None
            codec = build_codec(overrides)
            state = torch.load(os.path.join(ckpt, "codec.pth"), map_location="cpu", mmap=True, weights_only=True)
            state = state.get("state_dict", state)
            if any(k.startswith("generator.") for k in state):  # a training checkpoint: keep the generator only
                state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
            codec.load_state_dict(state, strict=False, assign=True)
            self._model, self._decode_one = model, decode_one
            self._codec = codec.to(device=self.device, dtype=torch.float32).eval()

        try:
            guard_oom(f"loading {ckpt} on {self.device}", load_all)
        except EngineError:
            raise
        except Exception as exc:  # corrupt .pth files, architecture mismatches...
            raise EngineError(f"cannot load {ckpt}: {type(exc).__name__}: {exc}") from exc
        self.sample_rate = int(self._codec.sample_rate)
        self.max_seq_len = int(self._model.config.max_seq_len)
        # Encoder transformers run at sample_rate / hop_length, the quantizer's pre/post modules at one step per
        # codec frame (frame_length samples); the decoder has none (commented out in modded_dac.DecoderBlock).
        hop, frame = int(self._codec.hop_length), int(self._codec.frame_length)
        blocks = {part: [m.config.block_size for m in getattr(self._codec, part).modules()
                         if isinstance(m, fish["CodecTransformer"])] for part in ("encoder", "quantizer")}
        samples = [b * hop for b in blocks["encoder"]] + [b * frame for b in blocks["quantizer"]]
        self.max_reference_s = min(samples, default=10**9) / self.sample_rate
        self.max_frames = min(blocks["quantizer"], default=10**9)
        from .prefix_cache import PrefixCache, prefix_budget

        self.prefixes = PrefixCache(prefix_budget(self.max_seq_len))
        if self.settings.compile:
            # torch.compile traces on the first call: pay it here, once per worker, before the worker says ready, so
            # no segment's deadline (FISH_SEGMENT_TIMEOUT_S) absorbs it. The batched steps at FISH_BATCH_SIZE rows,
            # on the kept caches (batch 1 too: it is a session of one row).
            session = self.open_batch(max(1, self.settings.batch_size), compiled=True)
            session.warm_up()
            session.close()

    def _require(self) -> None:
        if self._model is None:
            raise EngineError("FishSpeechEngine used before load()")

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.device.startswith("cuda") and self._dtype != torch.float32:
            return torch.autocast(device_type="cuda", dtype=self._dtype)
        return contextlib.nullcontext()

    # -- references ----------------------------------------------------------------------------------------------

    def encode_reference(self, audio_path: str) -> np.ndarray:
        self._require()
        import torch
        import torchaudio

        mono, rate = read_reference(audio_path)
        if len(mono) / rate > self.max_reference_s:
            raise BadReferenceError(f"reference audio {audio_path} is {len(mono) / rate:.1f} s long; this codec takes "
                                    f"at most {self.max_reference_s:.1f} s (10-30 s is plenty for cloning)")

        def encode() -> np.ndarray:
            audio = torch.from_numpy(mono)
            if rate != self.sample_rate:
                audio = torchaudio.functional.resample(audio, rate, self.sample_rate)
            audio = audio.to(self.device)[None, None]
            with torch.inference_mode(), self._autocast():
                indices, lengths = self._codec.encode(audio, torch.tensor([audio.shape[-1]], device=self.device))
            return indices[0, :, : int(lengths[0])].to("cpu", torch.int64).numpy()

        return guard_oom(f"encoding {audio_path}", encode)

    def beside(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (engine work such as encode_reference) on the calling thread, a thread beside the decode loop
        (fishmp.worker.voices): with the loading thread's torch thread count (a new thread starts with torch's
        default) and, on CUDA, on a stream of its own, so its kernels overlap the decode steps' instead of queueing
        behind them; that stream is synchronised before returning (results may be device tensors)."""
        self._require()
        import torch

        torch.set_num_threads(self._threads)
        if not self.device.startswith("cuda"):
            return fn()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._side_stream):
            out = fn()
        self._side_stream.synchronize()
        return out

    # -- synthesis -----------------------------------------------------------------------------------------------

    def _speaker_prompt(self, speaker: SpeakerPrompt | None) -> tuple[Any, str] | None:
        """Prompt tensors for the speaker, prepared once per key (the last key's are kept)."""
        if speaker is None:
            return None
        if speaker.key != self._prompt_key:
            import torch

            tokens = np.asarray(speaker.tokens)
            if tokens.ndim != 2 or tokens.shape[0] != self._model.config.num_codebooks or tokens.shape[1] == 0:
                raise BadReferenceError(f"speaker {speaker.key}: prompt tokens of shape {tokens.shape}, "
                                        f"expected ({self._model.config.num_codebooks}, T>0)")
            self._prompt = (torch.from_numpy(tokens.astype(np.int64)), speaker.text)
            self._prompt_key = speaker.key
        return self._prompt

    def prompt_length(self, text: str, prompt: tuple[Any, str] | None) -> int:
        """Tokens of the sequence generate_long builds for this text and prompt (same construction)."""
        fish = import_fish_speech()
        seq = fish["ContentSequence"](modality="interleave")
        if prompt is not None:
            seq.append([fish["TextPart"](text=prompt[1]), fish["VQPart"](codes=prompt[0])], add_end=True, speaker=0)
        seq.append([fish["TextPart"](text=text)], add_end=False, speaker=0)
        encoded, _, _ = seq.encode_for_inference(self._model.tokenizer, num_codebooks=self._model.config.num_codebooks)
        return int(encoded.shape[1])

    def synthesize(self, text: str, speaker: SpeakerPrompt | None, params: SynthesisParams) -> Audio:
        """One segment in a batch session of one row: the tokens any batch size gives it (fishmp.engines.batched)."""
        self._require()
        check_params(params)
        session = self.open_batch(1)
        try:
            session.add("", text, params, speaker)
            while True:
                for _, audio in session.step():
                    return audio
        finally:
            session.close()

    def synthesize_upstream(self, text: str, speaker: SpeakerPrompt | None, params: SynthesisParams) -> Audio:
        """fish-speech's own generate_long, chunk by chunk (its global RNG seeded seed + chunk index): the oracle of
        the model math in tests, and the benchmarks' baseline (fishmp before batching)."""
        self._require()
        import torch

        check_params(params)
        prompt = self._speaker_prompt(speaker)
        limit = self.max_seq_len - GENERATION_RESERVE
        if self.prompt_length("", prompt) >= limit:
            raise BadReferenceError(f"speaker {speaker.key if speaker else None}: the reference prompt alone does not "
                                    f"fit max_seq_len {self.max_seq_len}; use a shorter reference")
        chunks = split_text(text, lambda t: self.prompt_length(t, prompt) < limit) if text.strip() else []

        def run() -> tuple[np.ndarray, int]:
            pieces, frames = [], 0
            fork = torch.random.fork_rng(devices=[torch.device(self.device)] if self.device.startswith("cuda") else [],
                                         enabled=params.seed is not None)
            with fork, warnings.catch_warnings():
                # generate() re-wraps the sampling tensors with torch.tensor(tensor): a harmless per-call UserWarning.
                warnings.filterwarnings("ignore", message="To copy construct from a tensor")
                for i, chunk in enumerate(chunks):
                    if params.seed is not None:
                        torch.manual_seed(params.seed + i)
                    codes = self._generate(chunk, prompt, params)
                    frames += codes.shape[1]
                    pieces.append(self._decode(codes))
            samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
            return samples, frames

        samples, frames = guard_oom(f"synthesizing {len(text)} characters on {self.device}", run)
        return Audio(samples=samples, sample_rate=self.sample_rate, tokens=frames)

    def open_batch(self, capacity: int, compiled: bool | None = None, bucketed: bool = False,
                   codec_thread: bool = True) -> Any:
        """A BatchSession decoding up to `capacity` segments together, each row in its own speaker's voice
        (fishmp.engines.batched): same tokens for a row whatever its batchmates on CPU float32.
        compiled (default FISH_COMPILE): decode steps run one torch.compile'd step over static batch / length
        buckets; bucketed: eager steps padded the same way (tests); codec_thread: finished rows become audio on a
        thread of their own, off the decode loop (False: inline, the benchmarks' "before")."""
        self._require()
        from .batched import FishBatchSession

        compiled = self.settings.compile if compiled is None else compiled
        return FishBatchSession(self, capacity, compiled=compiled, bucketed=bucketed, codec_thread=codec_thread)

    def prefix(self, speaker: SpeakerPrompt | None, filled: bool = True) -> Any:
        """The speaker's prompt prefix and its KV (fishmp.engines.prefix_cache), prefilled once per worker and kept
        in a bounded cache. BadReferenceError when the speaker's prompt cannot be used. filled False: on a miss, the
        prefix unfilled (the batch session prefills it together with its row's text)."""
        self._require()
        from .prefix_cache import prefill_prefix, speaker_prefix

        if not filled:
            return speaker_prefix(self, speaker, None)

        def prefill(tokens: Any) -> tuple[list, list]:
            import torch

            with torch.inference_mode():
                return prefill_prefix(self._model, tokens, torch.device(self.device), self._dtype)

        key = speaker.key if speaker is not None else None
        return guard_oom(f"prefilling the prompt of speaker {key}", lambda: speaker_prefix(self, speaker, prefill))

    def compiled_batch(self) -> Any:
        """What this engine's compiled batch sessions share (batched_compile.CompiledBatch): the compiled steps and the
        KV caches they mutate, kept at fixed addresses for CUDA graphs."""
        if self._compiled_batch is None:
            from .batched_compile import CompiledBatch

            self._compiled_batch = CompiledBatch(self._model, self.device, self._dtype, self.max_seq_len)
        return self._compiled_batch

    def _generate(self, text: str, prompt: tuple[Any, str] | None, params: SynthesisParams) -> Any:
        inference = import_fish_speech()["inference"]
        codes = [
            r.codes
            for r in inference.generate_long(
                model=self._model, device=self.device, decode_one_token=self._decode_one, text=text,
                # Capped so one chunk's codes stay within what the codec can decode in one call.
                max_new_tokens=min(params.max_new_tokens, self.max_frames),
                top_p=params.top_p, temperature=params.temperature,
                repetition_penalty=params.repetition_penalty, compile=self.settings.compile,
                prompt_text=[prompt[1]] if prompt else None, prompt_tokens=[prompt[0]] if prompt else [],
            )
            if r.action == "sample"
        ]
        import torch

        return torch.cat(codes, dim=1)

    def _decode(self, codes: Any) -> np.ndarray:
        import torch

        if codes.shape[1] == 0:  # the model ended at once
            return np.zeros(0, np.float32)
        with torch.inference_mode(), self._autocast():
            audio, _ = self._codec.decode(codes[None].to(self.device).long(),
                                          torch.tensor([codes.shape[1]], device=self.device))
        return audio[0, 0].float().clamp(-1, 1).cpu().numpy()

    # -- housekeeping --------------------------------------------------------------------------------------------

    def release_memory(self) -> None:
        if self.prefixes is not None:
            self.prefixes.clear()  # speaker prefixes are prefilled again when needed
        if self._compiled_batch is not None:
            self._compiled_batch.drop_caches()  # a compiled session's KV rows, kept between sessions
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def fingerprint(self) -> str:
        # One definition shared with the torch-free main process (fishmp.planning.checkpoint): the sha256 of the small
        # files whole and of model.pth / codec.pth by size + first and last MiB (milliseconds even for GB files).
        if self._fingerprint is None:
            self._fingerprint = "fish-" + checkpoint_fingerprint(self.settings.checkpoint_dir)
        return self._fingerprint
