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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    error: str | None = None         # why it ended with "error" (its grammar failed)
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
    # with params.prompt_logprobs: entry i (i >= 1) is (logprob of prompt token i, [(token id, logprob)]
    # top alternatives) once computed; entry 0 stays None (nothing comes before the first token)
    prompt_logprobs: list | None = None
    prompt_rows_done: int = 0        # positions before this have their prompt-logprob row (p scores token p + 1)
    # A fork (Scheduler): a sequence whose prompt another running one (its leader) is prefilling
    # waits for the step with the leader's last prompt chunk, then shares every prompt block.
    leader: "Sequence | None" = field(default=None, repr=False)
    followers: list["Sequence"] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)

    def prompt_rows(self, start: int, n: int) -> range:
        """The positions among [start, start + n) whose prompt-logprob row is still to compute (empty
        unless the request asks for prompt logprobs)."""
        if self.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.prompt_rows_done), min(start + n, len(self.prompt_ids) - 1))

    def take_prompt_row(self, pos: int, logprob: float, top: list) -> None:
        """Record position pos's row (the logprob of prompt token pos + 1 and the top alternatives)."""
        self.prompt_logprobs[pos + 1] = (logprob, top)
        while (self.prompt_rows_done < len(self.prompt_ids) - 1
               and self.prompt_logprobs[self.prompt_rows_done + 1] is not None):
            self.prompt_rows_done += 1

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
