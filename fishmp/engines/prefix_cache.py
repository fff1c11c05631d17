"""Speaker prefixes for batched decoding: the prompt tokens every chunk of a speaker starts with, and their KV.

generate_long's prompt is `<|interleave|><|speaker:0|> reference text + reference codes <|im_end|> ... text`: all but
the text is the same for every segment of a speaker (the prefix). A worker prefills it once and keeps its KV in a
bounded LRU cache; a row of that speaker starts by copying it into its own cache slots [0, P) and prefills only its
text after it. Rows of different speakers then share a batch (mixed voices), each behind its own prefix.

A voice not in the cache is not prefilled on its own (a forward of its own, on the decode loop, before its row could
start): its Prefix comes back unfilled (`filled` False) and the batch session prefills the whole prompt, prefix and
text, in the row's own slots, in the same forward as the other starting rows' texts (fishmp.engines.batched); the
prefix's KV is then copied out of the row into the cache (`put`) for the voice's next rows.

Bound: PREFIX_CACHE_ROWS x max_seq_len tokens in all (fishmp.planning.memory counts it in a worker's memory), so the
cache never costs more than that many KV rows; the least recently used prefix goes first. A prefix that a row still
needs after its eviction lives on in that row's reference until the row has copied it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..planning.memory import PREFIX_CACHE_ROWS
from .base import BadReferenceError, EngineError, SpeakerPrompt
from .batched_model import forward_rows
from .fish_common import GENERATION_RESERVE, import_fish_speech


def encode_prompt(engine: Any, text: str, prompt: tuple[Any, str] | None) -> Any:
    """The (11, T) long tensor generate_long builds for this text and speaker prompt (same construction)."""
    fish = import_fish_speech()
    seq = fish["ContentSequence"](modality="interleave")
    if prompt is not None:
        seq.append([fish["TextPart"](text=prompt[1]), fish["VQPart"](codes=prompt[0])], add_end=True, speaker=0)
    seq.append([fish["TextPart"](text=text)], add_end=False, speaker=0)
    encoded, audio_masks, _ = seq.encode_for_inference(engine._model.tokenizer,
                                                       num_codebooks=engine._model.config.num_codebooks)
    if audio_masks is not None:  # only AudioPart sequences carry them; synthesize never builds one
        raise EngineError("batched decoding does not support audio-part prompts")
    return encoded.long()


@dataclass(frozen=True)
class Prefix:
    """One speaker's prefix: `key` (the voice's content key, "" without a voice), its prompt (tokens, transcript),
    tokens (11, P) long on the CPU, and its KV: per slow layer (H_kv, P, D) on the device."""

    key: str
    prompt: tuple[Any, str] | None
    tokens: Any
    k: tuple[Any, ...]
    v: tuple[Any, ...]
    filled: bool = True  # False: its KV is not computed yet (a voice not in the cache; see the module docstring)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


class PrefixCache:
    """Prefixes by speaker key, least recently used first out, at most `budget` tokens in all."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self.prefills = 0  # prefixes built (a miss each), for tests and benchmarks

    @property
    def tokens(self) -> int:
        return sum(p.length for p in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, build: Callable[[], Prefix]) -> Prefix:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        prefix = build()
        self.prefills += 1
        while self._entries and self.tokens + prefix.length > self.budget:
            self._entries.popitem(last=False)
        if prefix.length <= self.budget:
            self._entries[key] = prefix
        return prefix

    def peek(self, key: str) -> Prefix | None:
        """The cached prefix (now the most recently used), or None."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, prefix: Prefix) -> Prefix:
        """Keep a prefix filled by a row's own prefill (a miss, counted as a prefill like `get`'s)."""
        return self.get(prefix.key, lambda: prefix)

    def clear(self) -> None:
        self._entries.clear()


def prefill_prefix(model: Any, tokens: Any, device: Any, dtype: Any) -> tuple[list[Any], list[Any]]:
    """A speaker prefix (11, P) prefilled alone at slots [0, P): its K and V per slow layer, (H_kv, P, D) each
    (the cache keeps them; BatchedModel.copy_prefix writes them into a row)."""
    import torch

    cfg, p = model.config, tokens.shape[1]
    with torch.device(device):
        ks = [torch.zeros((1, cfg.n_local_heads, p, cfg.head_dim), dtype=dtype) for _ in model.layers]
        vs = [torch.zeros((1, cfg.n_local_heads, p, cfg.head_dim), dtype=dtype) for _ in model.layers]
        positions = torch.arange(p)[None, :]
        mask = (positions[0][None, :] <= positions[0][:, None])[None, None]
    forward_rows(model, ks, vs, tokens[None].to(device), slice(0, 1), positions, slice(0, p), mask, p)
    return [k[0] for k in ks], [v[0] for v in vs]


def prefix_budget(max_seq_len: int) -> int:
    """Tokens the cache may hold: PREFIX_CACHE_ROWS KV rows' worth."""
    return PREFIX_CACHE_ROWS * max_seq_len


def speaker_prefix(engine: Any, speaker: SpeakerPrompt | None,
                   prefill: Callable[[Any], tuple[list, list]] | None) -> Prefix:
    """The speaker's Prefix from the engine's cache, built on a miss: the prompt tensors (BadReferenceError when the
    tokens have the wrong shape or the prompt alone does not fit), the tokens two different texts share, and
    `prefill(tokens)` -> their KV per layer. prefill None: on a miss, the Prefix unfilled and not cached (its row
    prefills it with its text; the session then `put`s it)."""
    key = speaker.key if speaker is not None else ""
    if prefill is None and (hit := engine.prefixes.peek(key)) is not None:
        return hit

    def tokens_of() -> tuple[Any, Any]:
        prompt = engine._speaker_prompt(speaker)
        if engine.prompt_length("", prompt) >= engine.max_seq_len - GENERATION_RESERVE:
            raise BadReferenceError(f"speaker {key or None}: the reference prompt alone does not fit max_seq_len "
                                    f"{engine.max_seq_len}; use a shorter reference")
        a, b = encode_prompt(engine, "a", prompt), encode_prompt(engine, "b", prompt)
        n = min(a.shape[1], b.shape[1])
        differ = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
        return prompt, a[:, : int(differ[0]) if len(differ) else n]

    if prefill is None:
        prompt, tokens = tokens_of()
        return Prefix(key, prompt, tokens, (), (), filled=False)

    def build() -> Prefix:
        prompt, tokens = tokens_of()
        k, v = prefill(tokens)
        return Prefix(key, prompt, tokens, tuple(k), tuple(v))

    return engine.prefixes.get(key, build)
