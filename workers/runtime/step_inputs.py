"""Per-step metadata a stage needs, prepared once per step from the broadcast plan."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    input_ids: torch.Tensor     # [T] on device (used by the first stage)
    positions: torch.Tensor     # [T] on device
    slot_mapping: torch.Tensor  # [T] on device
    block_tables: torch.Tensor  # [B, M] on device
    query_lens: list[int]       # host ints, from the plan (no device sync)
    context_lens: list[int]     # host ints: tokens cached for the sequence after this step
    sample_index: torch.Tensor  # [B] on device: the last token of each sequence

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens))
