"""A segment's takes while the take check runs (fishmp/worker/takes.py judges them; lanes.py retakes): the takes
so far with only the best one's audio kept, and the take a segment keeps, with its record for Done."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engines import Audio
from .takes import Verdict, best_index


@dataclasses.dataclass(frozen=True)
class KeptTake(Audio):
    """The take a segment keeps, with its take record (takes tried, verdicts, kept seed, suspect) for Done."""

    take: dict[str, Any] | None = None


class Takes:
    """A segment's takes so far; only the best one's audio is kept in memory."""

    def __init__(self, base_seed: int | None, fit: dict[str, Any] | None = None) -> None:
        self.base_seed = base_seed
        self.fit = fit  # a fitted segment: the take needing the least stretch is the best (takes.py fitted_index)
        self.fit_tries = 0  # seeds tried only because the best take needed more than max_speed
        self.verdicts: list[Verdict] = []
        self.seeds: list[int | None] = []
        self.best = 0
        self.audio: Audio | None = None

    @property
    def any_passed(self) -> bool:
        return any(v.passed for v in self.verdicts)

    def add(self, verdict: Verdict, audio: Audio, seed: int | None) -> None:
        from .takes import fitted_index

        self.verdicts.append(verdict)
        self.seeds.append(seed)
        best = fitted_index(self.verdicts, self.fit) if self.fit else best_index(self.verdicts)
        if best == len(self.verdicts) - 1 or self.audio is None:
            self.best, self.audio = best, audio
