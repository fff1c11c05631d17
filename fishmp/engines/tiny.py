"""Randomly initialised Fish Speech checkpoints in the openaudio-s1-mini layout, built from fish-speech's own classes.

Random weights: the audio is noise-like, never speech. They exist to run the real code paths (tests, CI) and to
measure memory and speed on a GPU without downloading the real model.

`size="tiny"` (about 10 MB, bf16 tensors; load + encode + ~50 tokens + decode in about 1-2 s on a 2-core CPU):
  LLM  DualARModelArgs n_layer=2, n_head=2, n_local_heads=1, head_dim=32, dim=64, intermediate_size=128,
       n_fast_layer=1, fast_dim=64, codebook_size=4096, num_codebooks=10, qk-norm, max_seq_len=2560
       (fish-speech reserves 2048 tokens for generation, so ~500 tokens remain for reference + text).
  codec the packaged modded_dac_vq.yaml with small overrides (written to codec_overrides.json, which
       FishSpeechEngine merges over the yaml): encoder_dim 8 (latent 128 = quantizer/pre/post input_dim),
       decoder_dim 64, one encoder transformer layer in the last block, no decoder transformer layers,
       1-layer 64-dim pre/post transformers, block sizes 8192/2048 (references and generated chunks up to ~95 s,
       more than max_seq_len 2560 can generate).
       sample_rate 44100, 9 x 1024 residual codebooks and the 4096 semantic codebook are unchanged.
`size="s1-mini"` (about 1.4 GB LLM in bf16 + 0.8 GB codec in bf16): the real S1-mini SIZE with random weights.
  LLM  config values are an ASSUMPTION, not verified against fishaudio/openaudio-s1-mini's config.json: Qwen3-0.6B
       shape (28 layers, dim 1024, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, rope_base 1e6,
       norm_eps 1e-6, qk-norm, tied embeddings), vocab 155776 (as in Fish's Qwen3-based S2 configs), 4 fast layers
       (fish-speech's DualARModelArgs default), max_seq_len 8192 (consistent with the 0.94 GB bf16 KV cache
       measured by others). The semantic tokens are placed at the END of the vocabulary (ids 151680..155775), so a
       random model can never sample an id past the codebook (the real tokenizer differs in ids; irrelevant for
       memory and speed).
  codec the packaged yaml exactly (391 M parameters).

Tokenizer: 256 single-byte ranks (no merges: one token per UTF-8 byte), padding ranks up to the special tokens
where the vocabulary needs them, then fish-speech's special tokens and <|semantic:0..4095|>; special_tokens.json
lists them in id order. Everything is seeded: the same call writes the same bytes for the tensors.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from .fish_common import CODEC_OVERRIDES_FILE, build_codec, import_fish_speech

SEMANTIC_CODEBOOK = 4096

_TINY_LLM: dict[str, Any] = dict(
    n_layer=2, n_head=2, n_local_heads=1, head_dim=32, dim=64, intermediate_size=128, n_fast_layer=1, fast_dim=64,
    max_seq_len=2560, rope_base=10000, norm_eps=1e-5,
)
_S1_MINI_LLM: dict[str, Any] = dict(
    n_layer=28, n_head=16, n_local_heads=8, head_dim=128, dim=1024, intermediate_size=3072, n_fast_layer=4,
    max_seq_len=8192, rope_base=1000000, norm_eps=1e-6, vocab_size=155776,
)
_SMALL_TRANSFORMER = {
    "_target_": "fish_speech.models.dac.modded_dac.WindowLimitedTransformer", "causal": True, "window_size": 128,
    "input_dim": 128,
    "config": {"_target_": "fish_speech.models.dac.modded_dac.ModelArgs", "block_size": 2048, "n_layer": 1,
               "n_head": 1, "dim": 64, "intermediate_size": 128, "n_local_heads": -1, "head_dim": 64,
               "rope_base": 10000, "norm_eps": 1e-5, "dropout_rate": 0.0, "attn_dropout_rate": 0.0,
               "channels_first": True},
}
TINY_CODEC_OVERRIDES: dict[str, Any] = {
    "encoder_dim": 8, "decoder_dim": 64,
    "encoder_transformer_layers": [0, 0, 0, 1], "decoder_transformer_layers": [0, 0, 0, 0],
    "transformer_general_config": {"block_size": 8192},
    "quantizer": {"input_dim": 128, "pre_module": _SMALL_TRANSFORMER, "post_module": _SMALL_TRANSFORMER},
}


def _special_tokens() -> list[str]:
    from fish_speech.tokenizer import ALL_SPECIAL_TOKENS, SEMANTIC_TOKEN_TEMPLATE

    named = [t for t in ALL_SPECIAL_TOKENS if not t.startswith("<|semantic:")]
    return named + [SEMANTIC_TOKEN_TEMPLATE.format(i=i) for i in range(SEMANTIC_CODEBOOK)]


def _write_tokenizer(path: str, vocab_size: int | None) -> int:
    """Writes tokenizer.tiktoken + special_tokens.json; returns the vocab size (semantic_end_id + 1)."""
    specials = _special_tokens()
    n_ranks = 256 if vocab_size is None else vocab_size - len(specials)
    # Padding ranks are 5-byte strings: with no 2-byte tokens BPE can never merge up to them, so text still encodes
    # one token per byte; 0xF8 is never valid UTF-8.
    ranks = [bytes([b]) for b in range(256)] + [b"\xf8" + i.to_bytes(4, "big") for i in range(n_ranks - 256)]
    with open(os.path.join(path, "tokenizer.tiktoken"), "w") as f:
        f.writelines(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(ranks))
    with open(os.path.join(path, "special_tokens.json"), "w") as f:
        json.dump({tok: n_ranks + i for i, tok in enumerate(specials)}, f, indent=0)
    return n_ranks + len(specials)


def write_checkpoint(path: str, size: str = "tiny") -> None:
    """Write a seeded random checkpoint (config.json, model.pth, tokenizer.tiktoken, special_tokens.json, codec.pth)."""
    if size not in ("tiny", "s1-mini"):
        raise ValueError(f"size must be 'tiny' or 's1-mini', not {size!r}")
    fish = import_fish_speech()
    import torch
    from fish_speech.tokenizer import FishTokenizer

    os.makedirs(path, exist_ok=True)
    llm = dict(_TINY_LLM if size == "tiny" else _S1_MINI_LLM)
    vocab_size = _write_tokenizer(path, llm.pop("vocab_size", None))
    args = dict(model_type="dual_ar", vocab_size=vocab_size, codebook_size=SEMANTIC_CODEBOOK, num_codebooks=10,
                attention_qk_norm=True, tie_word_embeddings=True, dropout=0.0, **llm)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(args, f, indent=2, sort_keys=True)
    config = fish["BaseModelArgs"].from_pretrained(path)
    tokenizer = FishTokenizer.from_pretrained(path)
    assert tokenizer.semantic_end_id + 1 == vocab_size  # a random model must not sample past the codebook

    dtype = torch.bfloat16  # halves the files; the engine casts to its compute dtype on load
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(1234)
        model = fish["DualARTransformer"](config, tokenizer=tokenizer)
        torch.save({k: v.to(dtype) for k, v in model.state_dict().items()}, os.path.join(path, "model.pth"))
        del model
        overrides = TINY_CODEC_OVERRIDES if size == "tiny" else None
        codec = build_codec(overrides)
        # The codec transformers' causal masks and RoPE tables are buffers the model rebuilds itself: not stored.
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in codec.state_dict().items()
                 if not k.endswith(("causal_mask", "freqs_cis"))}
        torch.save(state, os.path.join(path, "codec.pth"))
    overrides_path = os.path.join(path, CODEC_OVERRIDES_FILE)
    if overrides:
        with open(overrides_path, "w") as f:
            json.dump(overrides, f, indent=1, sort_keys=True)
    elif os.path.exists(overrides_path):
        os.remove(overrides_path)
