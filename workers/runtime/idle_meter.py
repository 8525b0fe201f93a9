"""How long a rank's GPU sits idle between steps, waiting for its host: the control plane's exposed
cost (a step whose plan was sent ahead starts the moment the previous one ends: no gap).

CUDA events recorded at each step's first and last device operation; the gap between one step's
end and the next one's start is time the GPU had nothing queued. Read once, at the end of a run.
"""
from __future__ import annotations

import torch


class IdleMeter:
    def __init__(self):
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None

    def step_started(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record()

    def step_ended(self) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((self._start, end))

    def idle_s(self) -> tuple[float, int]:
        """(total idle seconds between consecutive steps, steps measured); waits for the device."""
        if not self._events:
            return 0.0, 0
        self._events[-1][1].synchronize()
        gaps = [earlier[1].elapsed_time(later[0]) for earlier, later in zip(self._events, self._events[1:])]
        return sum(max(0.0, g) for g in gaps) / 1e3, len(self._events)
