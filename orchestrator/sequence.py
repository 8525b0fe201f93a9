"""A request's state as the scheduler sees it: tokens, KV blocks, progress and outcome."""
from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.orchestrator.sampling_params import SamplingParams


@dataclass(eq=False)  # identity equality: list.remove/index must not compare token lists
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0            # tokens whose K/V are in the cache
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    first_logits: list[float] | None = None
    arrival: int = -1                # order in which the scheduler received it (FCFS key)
    # Prefix-cache content id of each leading full block of block_table that is computed;
    # block i's id names the whole token prefix [0, (i + 1) * block_size).
    block_cids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0       # prompt tokens served by the prefix cache at the last admission
    num_preemptions: int = 0
    in_flight: int = 0               # steps holding it whose results are not back yet (Scheduler.advance)
    scheduled_to: int = 0            # tokens whose K/V will be cached once those steps are done
    grammar: object | None = None    # its GrammarMatcher when the output must follow a grammar

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
