"""FISH_COMPILE with batching: the steps of fishmp.engines.batched_model under torch.compile, built once per engine,
and the KV caches they mutate, kept between sessions."""

from __future__ import annotations

from typing import Any

from .batched_model import bucket_rows, decode_rows, fast_draw, fast_rows, layer_rows, main_draw, mark_static


class CompiledBatch:
    """What the compiled batch sessions of one engine share (FISH_COMPILE with batching): layer_rows, fast_rows,
    main_draw and fast_draw under torch.compile, and the KV caches those steps mutate, kept from session to session
    so CUDA graphs see the same addresses (a new address would re-record every graph)."""

    def __init__(self, model: Any, device: str, dtype: Any, max_seq_len: int) -> None:
        self.model, self.device, self.dtype, self.max_seq_len = model, device, dtype, max_seq_len
        self._steps: tuple[Any, Any, Any, Any] | None = None
        self._caches: tuple[int, list[Any], list[Any], dict[int, Any]] | None = None  # capacity, K, V, fast by b
        self._owner: Any = None

    def steps(self, backend: str | None = None) -> tuple[Any, Any, Any, Any]:
        """The compiled steps, built once: (decode_rows over a compiled layer_rows, compiled fast_rows, main_draw
        and fast_draw: the slow transformer, the fast one and sampling), each one graph (fullgraph: a graph break
        is an error, never a silent fallback to eager ops); inductor with CUDA graphs (mode="reduce-overhead") on
        CUDA, aot_eager on CPU (as the batch-1 path; `backend` overrides, e.g. "inductor" on CPU). The slow
        transformer is compiled per layer (one graph for all 28 of S1-mini: compiling the unrolled model took
        176-187 s with inductor on a 2-core CPU, per layer 45-48 s in all, and the unrolled one did not finish in
        ~190 s on an H200). Shapes come bucketed (batch >= 2, attention length): each function compiles twice
        whatever the buckets (its first shape static, then one graph dynamic in batch and length); CUDA graphs
        record once per bucket shape and function (cheap)."""
        if self._steps is None:
            import functools

            import torch

            on_cuda = self.device.startswith("cuda")
            backend = backend or ("inductor" if on_cuda else "aot_eager")
            mode = "reduce-overhead" if on_cuda and backend == "inductor" else None
            # dynamic=None (automatic): the first shape compiles static, the second a graph dynamic in exactly the
            # dims that changed (rows, attention length). dynamic=True would make every dim symbolic and unify equal
            # sizes (batch 2 with the rotary pair's 2), which specialised the batch and compiled again.
            def compiled(fn: Any) -> Any:
                return torch.compile(fn, backend=backend, mode=mode, dynamic=None, fullgraph=True)

            self._steps = (functools.partial(decode_rows, layer_step=compiled(layer_rows)), compiled(fast_rows),
                           compiled(main_draw), compiled(fast_draw))
        return self._steps

    def caches(self, capacity: int, owner: Any) -> tuple[list[Any], list[Any], dict[int, Any]] | None:
        """The kept (K, V, fast caches by batch size) for at least `capacity` rows, now held by `owner`; None while
        another open session holds them (that one then allocates its own). A smaller session uses the first rows of
        the kept caches as they are (same tensors and shapes: no recompile, and the CUDA graphs recorded so far stay
        valid)."""
        import torch

        if self._owner is not None:
            return None
        capacity = bucket_rows(capacity)
        if self._caches is None or self._caches[0] < capacity:
            self._caches = None  # freed before the new ones are allocated
            cfg = self.model.config
            shape = (capacity, cfg.n_local_heads, self.max_seq_len, cfg.head_dim)
            with torch.device(self.device):
                ks = [torch.zeros(shape, dtype=self.dtype) for _ in self.model.layers]
                vs = [torch.zeros(shape, dtype=self.dtype) for _ in self.model.layers]
            mark_static(ks + vs, self.device)
            self._caches = (capacity, ks, vs, {})
        self._owner = owner
        return self._caches[1:]

    def release(self, owner: Any) -> None:
        if self._owner is owner:
            self._owner = None

    def drop_caches(self) -> None:
        """Free the kept caches unless a session holds them (after an out-of-memory error)."""
        if self._owner is None:
            self._caches = None
