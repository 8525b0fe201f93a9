"""The Python API: `LLM(engine_or_config).generate(prompts, params)` and `.chat(messages, params)`.

    from meshserve import LLM, SamplingParams
    with LLM("engines/l8b-tp2pp2") as llm:
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
        print(out[0].text)

The ranks start when the LLM is made and stop when it is closed. Text (detokenization, stop strings)
is made here, by the same component as for the HTTP server, so both give the same bytes.
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """One request's result. text is None for an engine without a tokenizer; logprobs (the chosen
    token's) and top_logprobs ([(token id, logprob)] per token) are set when params.logprobs is;
    prompt_logprobs and prompt_top_logprobs likewise per prompt token when params.prompt_logprobs is
    (the first prompt token has None in both: nothing comes before it)."""
    index: int
    prompt_token_ids: list[int]
    text: str | None
    token_ids: list[int]
    finish_reason: str                      # "stop" (end-of-sequence, stop token or string) | "length" | "error"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    first_logits: list[float] | None = None  # with params.return_logits
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    error: str | None = None                 # why finish_reason is "error" (the grammar failed)


def _engine_dir(model: str, show_progress: bool):
    """The engine folder, and the runtime limits a config asks for (None for a plain folder)."""
    if str(model).endswith((".yaml", ".yml")):
        from meshserve.orchestrator.config import load_config
        from meshserve.orchestrator.engine_resolve import ensure_engine, runtime_limits
        cfg = load_config(model)
        return ensure_engine(cfg, show_progress=show_progress), runtime_limits(cfg)
    return str(model), None


class LLM:
    """Start the ranks of an engine and generate through them.

    model: an engine folder (`meshserve build`) or a YAML config (its engine is built on first use).
    tp, pp: optional, checked against the engine's layout. limits: a RuntimeLimits (batch size, tokens
    per step, sequence length, KV block size and count; None: the engine's, or the config's). Started by hand, the ranks run in child
    processes of this one (one rank runs in this process). Under mpirun, srun or torchrun every
    process is one rank and makes the LLM: on rank 0 it returns ready to generate; on every other rank
    the constructor serves rank 0's steps and returns only once rank 0 closes its LLM, and
    `generate`/`chat` there return []. Only rank 0 gets results.
    """

    def __init__(self, model: str | Path, *, tp: int | None = None, pp: int | None = None, limits=None,
                 show_progress: bool = False):
        from meshserve.workers.engine_files import read_engine_meta
        self.engine_dir, config_limits = _engine_dir(str(model), show_progress)
        self.limits = limits if limits is not None else config_limits
        self.meta = meta = read_engine_meta(self.engine_dir, self.limits)
        for name, want, have in (("tp", tp, meta.tp), ("pp", pp, meta.pp)):
            if want is not None and want != have:
                raise UserError(f"{name}={want} was asked, but engine {self.engine_dir} is built for {name}={have}; "
                                f"rebuild it with `meshserve build --{name} {want}` or leave {name} out")
        self.show_progress = show_progress
        self.tokenizer = None
        if meta.has_tokenizer:
            from meshserve.orchestrator.tokenizer import Tokenizer
            self.tokenizer = Tokenizer(meta.dir)
        self._engine, self._session, self._ranks = None, None, None
        self._start()
        self._driver = self._engine is not None

    def _start(self) -> None:
        from meshserve.launch.local_spawn import LocalRanks, check_world_size
        from meshserve.launch.rank_env import discover, launched_env
        from meshserve.orchestrator.engine_channel import InProcessEngine, PipeEngine
        from meshserve.orchestrator.engine_loop import EngineLoop
        from meshserve.orchestrator.rank_program import RankSession
        env = launched_env()
        if env is not None:
            check_world_size(env, self.meta.world_size, self.meta.tp)
        if env is None and self.meta.world_size > 1:
            parent, child = mp.get_context("spawn").Pipe()
            self._ranks = LocalRanks(self.meta.world_size, _channel_rank, self.engine_dir, child, self.limits,
                                     daemon=True)  # a script that never closes its LLM still exits
            child.close()
            self._engine = PipeEngine(parent, self._ranks)
            return
        self._session = RankSession(env or discover(), self.engine_dir, self.limits)
        if not self._session.is_driver:
            self._session.follow()
            self._session = None
            return
        try:
            self._engine = InProcessEngine(EngineLoop(self._session.runner, self.meta, self._session.broadcast,
                                                      self.tokenizer))
        except BaseException:
            self._session.close(ok=False)
            raise

    @property
    def is_driver(self) -> bool:
        """True on the process that gets results (not on launched ranks other than 0)."""
        return self._driver

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else self._tokenizer("text prompts").encode(p) for p in prompts]
        return self.generate_ids(ids, params)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """messages: one conversation ([{"role", "content"}, ...]) or a list of them; the tokenizer's
        chat template turns each into a prompt."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self._tokenizer("chat")
        return self.generate_ids([tok.encode_chat(c) for c in conversations], params)

    def generate_ids(self, prompts: list[list[int]], params=None) -> list[RequestOutput]:
        from meshserve.orchestrator.engine_loop import check_prompt
        if not self.is_driver:
            return []
        if self._engine is None:
            raise UserError("this LLM is closed")
        params = params if params is not None else SamplingParams()
        per = params if isinstance(params, list) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise UserError(f"{len(per)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
        for i, (ids, p) in enumerate(zip(prompts, per, strict=True)):
            try:
                check_prompt(self.meta, ids, p)
            except UserError as err:
                raise UserError(f"prompt {i}: {err}") from None
        return self._run(prompts, per)

    def _tokenizer(self, what: str):
        if self.tokenizer is None:
            raise UserError(f"engine {self.engine_dir} has no tokenizer, so {what} cannot be used: pass token ids")
        return self.tokenizer

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        from tqdm import tqdm

        from meshserve.launch.local_spawn import RankFailed
        from meshserve.orchestrator.request_text import RequestText
        engine = self._engine
        outputs, texts, index_of = [], {}, {}
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                rid = engine.add(ids, p)
            except RankFailed:
                raise
            except UserError as err:
                for other in index_of:
                    engine.abort(other)
                raise UserError(f"prompt {i}: {err}") from None
            index_of[rid] = i
            outputs.append(RequestOutput(i, list(ids), None, [], "", [] if p.logprobs is not None else None,
                                         [] if p.logprobs is not None else None))
            if self.tokenizer is not None:
                texts[rid] = RequestText(self.tokenizer, p, ids)
        running = set(index_of)
        bar = tqdm(total=len(prompts), unit="req", desc="generating", disable=not self.show_progress)
        try:
            while running:
                events = engine.step()
                if not events and not engine.busy:
                    raise RuntimeError(f"the engine went idle with {len(running)} request(s) unfinished")
                for ev in events:
                    if ev.request_id not in running:
                        continue
                    out = outputs[index_of[ev.request_id]]
                    if ev.finish_reason == "error":  # the grammar failed: the token is no part of the answer
                        out.finish_reason, out.error = "error", ev.error
                        if ev.request_id in texts:
                            texts[ev.request_id].end("error")
                        running.discard(ev.request_id)
                        bar.update(1)
                        continue
                    out.token_ids.append(ev.token_id)
                    if out.logprobs is not None:
                        out.logprobs.append(ev.logprob)
                        out.top_logprobs.append([tuple(t) for t in ev.top_logprobs or []])
                    if ev.first_logits is not None:
                        out.first_logits = ev.first_logits
                    if ev.prompt_logprobs is not None:
                        out.prompt_logprobs = [None if e is None else e[0] for e in ev.prompt_logprobs]
                        out.prompt_top_logprobs = [None if e is None else [tuple(t) for t in e[1]]
                                                   for e in ev.prompt_logprobs]
                    reason = ev.finish_reason
                    if ev.request_id in texts:
                        reason = texts[ev.request_id].add(ev.token_id, reason).finish_reason
                        if reason is not None and ev.finish_reason is None:
                            engine.abort(ev.request_id)  # a stop string: the engine drops the rest
                    if reason is not None:
                        out.finish_reason = reason
                        running.discard(ev.request_id)
                        bar.update(1)
        finally:
            bar.close()
        for rid, i in index_of.items():
            if rid in texts:
                outputs[i].text = texts[rid].text
        return outputs

    # ---- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every rank (on rank 0 under a launcher: tell the others to stop)."""
        engine, self._engine = self._engine, None
        closed = False
        try:
            if engine is not None:
                engine.close()
            closed = True
        finally:
            if self._session is not None:
                self._session.close(ok=closed)
                self._session = None
            if self._ranks is not None:
                ranks, self._ranks = self._ranks, None
                if closed:
                    ranks.join(30.0)
                failure = ranks.failure()
                ranks.stop()
                if closed and failure is not None:
                    raise failure

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            if issubclass(exc_type, KeyboardInterrupt):
                self._stop_now()
            self.close()
        except BaseException:
            pass  # the error that is already on its way says more

    def _stop_now(self) -> None:
        """Stop the ranks without waiting for rank 0 (Ctrl-C: it may still be loading its shard)."""
        self._engine = None
        if self._ranks is not None:
            ranks, self._ranks = self._ranks, None
            ranks.stop()


def _channel_rank(env, engine_dir: str, conn, limits) -> None:
    """Every rank of a locally started LLM; rank 0 answers the front end over `conn`."""
    from meshserve.orchestrator.engine_channel import serve_channel
    from meshserve.orchestrator.engine_loop import EngineLoop
    from meshserve.orchestrator.rank_program import run_on_mesh

    def drive(runner, meta, broadcast):
        tokenizer = None
        if meta.has_tokenizer:
            from meshserve.orchestrator.tokenizer import Tokenizer
            tokenizer = Tokenizer(meta.dir)
        serve_channel(conn, EngineLoop(runner, meta, broadcast, tokenizer))

    run_on_mesh(env, engine_dir, drive, limits)
