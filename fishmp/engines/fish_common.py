"""What Fish Speech's batch-1 engine (fish.py) and its batch sessions (batched.py) share: the lazy import of
fish_speech, the codec built from the packaged config, text splitting at sentences, parameter checks and the
out-of-memory guard. Both import this module; neither imports the other (fish.py opens batched sessions lazily).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import Any

from .base import (
    EngineOutOfMemoryError,
    SynthesisParams,
    TextTooLongError,
)

CODEC_OVERRIDES_FILE = "codec_overrides.json"


# fish-speech's generate_long refuses a prompt of max_seq_len - 2048 tokens or more (room for 2048 new tokens).
GENERATION_RESERVE = 2048


_fish: dict[str, Any] = {}


def import_fish_speech() -> dict[str, Any]:
    """Import the fish_speech modules once, undoing or silencing their process-wide side effects."""
    if _fish:
        return _fish
    saved = dict(os.environ)
    try:
        import fish_speech
        import fish_speech.models.dac.modded_dac  # noqa: F401  (hydra targets of the codec yaml)
        import fish_speech.models.dac.rvq  # noqa: F401
        import fish_speech.models.text2semantic.inference as inference
        from fish_speech.content_sequence import ContentSequence, TextPart, VQPart
        from fish_speech.models.dac.modded_dac import Transformer as CodecTransformer
        from fish_speech.models.text2semantic.llama import BaseModelArgs, DualARTransformer
        from loguru import logger
    finally:
        # inference.py sets TOKENIZERS_PARALLELISM=false at import; leave the host environment as it was.
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update({k: v for k, v in saved.items() if os.environ.get(k) != v})
    logger.disable("fish_speech")
    inference.tqdm = lambda iterable, *args, **kwargs: iterable  # decode_n_tokens wraps every token in a tqdm bar
    _fish.update(
        inference=inference, ContentSequence=ContentSequence, TextPart=TextPart, VQPart=VQPart,
        BaseModelArgs=BaseModelArgs, DualARTransformer=DualARTransformer, CodecTransformer=CodecTransformer,
        codec_yaml=os.path.join(list(fish_speech.__path__)[0], "configs", "modded_dac_vq.yaml"),  # a namespace package
    )
    return _fish


def build_codec(overrides: dict[str, Any] | None = None) -> Any:
    """A randomly initialised DAC codec from the packaged yaml, with `overrides` merged over it."""
    fish = import_fish_speech()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(fish["codec_yaml"])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    with warnings.catch_warnings():  # modded_dac still uses the deprecated torch.nn.utils.weight_norm
        warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated", category=FutureWarning)
        return instantiate(cfg)


_SPLIT_LEVELS = (
    re.compile(r"[.!?…]+[\"')\]]*\s+|[。！？]+\s*|\s*\n+\s*"),  # sentence ends (not "3.14": needs a space after)
    re.compile(r"[,;:，、；：]+\s*"),  # clauses
    re.compile(r"\s+"),  # words
)


def _cut(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Slice text after each match, keeping the separators with the piece before them."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            pieces.append(text[start:m.end()])
            start = m.end()
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def split_text(text: str, fits: Callable[[str], bool]) -> list[str]:
    """Split text into as few chunks as possible that each `fits`, cutting at sentence ends first, then at clause
    punctuation, then at whitespace. Raises TextTooLongError if a piece without any of those still does not fit."""
    text = text.strip()
    if fits(text):
        return [text]
    for pattern in _SPLIT_LEVELS:
        pieces = _cut(text, pattern)
        if len(pieces) > 1:
            break
    else:
        raise TextTooLongError(f"text piece of {len(text)} characters does not fit the model and cannot be split: "
                               f"{text[:60]!r}...")
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and not fits((current + piece).strip()):
            chunks.append(current.strip())
            current = piece
        else:
            current += piece
    chunks.append(current.strip())
    return [c for chunk in chunks for c in ([chunk] if fits(chunk) else split_text(chunk, fits))]


def check_params(params: SynthesisParams) -> None:
    """The ranges generate_long asserts, as a one-line ValueError. max_new_tokens 1 is refused too: fish-speech's
    decode loop then runs zero times and fails (UnboundLocalError in decode_n_tokens)."""
    if not (0 < params.top_p <= 1 and 0 < params.temperature < 2 and 0 < params.repetition_penalty < 2
            and params.max_new_tokens >= 2):
        raise ValueError(f"sampling parameters out of range for fish-speech: {params} (allowed: 0 < top_p <= 1, "
                         f"0 < temperature < 2, 0 < repetition_penalty < 2, max_new_tokens >= 2)")


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def guard_oom(what: str, fn: Callable[[], Any]) -> Any:
    """Run fn; turn an out-of-memory error into EngineOutOfMemoryError raised outside the except block, so the
    original traceback (and the tensors its frames hold) is not kept alive by __context__."""
    try:
        return fn()
    except Exception as exc:
        if not _is_oom(exc):
            raise
        message = f"{what}: out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    raise EngineOutOfMemoryError(message)


def encode_inline(tokenizer: Any) -> None:
    """Make fish-speech's FishTokenizer.encode cheap, with the same tokens. It encodes through tiktoken's
    `encode_batch`, which builds a ThreadPoolExecutor (and starts a thread) for every call, for a single piece of
    text, and passes all its special tokens as allowed (4,111 with the tiny checkpoint's 4,096 semantic tokens), which
    tiktoken converts for every call: 3.9 ms a call here, against 0.01 ms for tiktoken's `encode` in the calling thread
    with only the special tokens the text holds. A worker tokenizes each segment's prompt several times (text
    splitting, every chunk's prompt, a new voice's prefix), on the decode loop: 6-9 % of its time at batch 8 went
    there (profiled). A special token not in the text cannot match, so allowing only those found in it changes
    nothing; every special token has the shape `<|...|>` with none of `<`, `>`, `|` inside, so a regex finds every
    occurrence (checked once here: any other shape keeps the full set). Set on this tokenizer instance only."""
    tkt = getattr(tokenizer, "tkt_model", None)
    if tkt is None or not callable(getattr(type(tokenizer), "encode", None)):
        return  # not the tokenizer this was written for: leave it as it is
    from fish_speech.tokenizer import TIKTOKEN_MAX_ENCODE_CHARS

    specials = tkt.special_tokens_set
    shape = re.compile(r"<\|[^<>|]*\|>")
    findable = all(shape.fullmatch(t) for t in specials)

    def encode(s: str, allowed_special: bool | set[str] = True) -> list[int]:
        assert isinstance(s, str)
        allowed = specials if allowed_special is True else (set() if allowed_special is False else allowed_special)
        out: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            piece = s[i:i + TIKTOKEN_MAX_ENCODE_CHARS]
            present = set(shape.findall(piece)) & allowed if findable else allowed
            out += tkt.encode(piece, allowed_special=present, disallowed_special=frozenset())
        return out

    tokenizer.encode = encode
