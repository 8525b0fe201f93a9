"""`meshserve generate`: JSONL prompts in, JSONL completions out, through the rank mesh.

Input lines: {"prompt": str} | {"prompt_token_ids": [int]} | {"messages": [...]}, with optional
max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, presence_penalty,
frequency_penalty, repetition_penalty, ignore_eos, return_logits. Output lines, in input order:
{"index", "text", "token_ids", "finish_reason"} (+ "logits" when asked).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.sampling_params import SamplingParams

_PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")
_PARAM_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
               "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "return_logits")


def read_requests(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input {p} does not exist; pass a JSONL file with one {{\"prompt\": ...}} per line")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            req = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(req, dict):
            raise UserError(f"{where}: each line must be a JSON object")
        given = [k for k in _PROMPT_KEYS if k in req]
        if len(given) != 1:
            raise UserError(f"{where}: give exactly one of {', '.join(_PROMPT_KEYS)}")
        unknown = sorted(set(req) - set(_PROMPT_KEYS) - set(_PARAM_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(_PROMPT_KEYS + _PARAM_KEYS)}")
        kind = given[0]
        value = req[kind]
        if kind == "prompt" and not isinstance(value, str):
            raise UserError(f"{where}: prompt must be a string")
        if kind == "prompt_token_ids" and not (isinstance(value, list) and value
                                               and all(isinstance(t, int) for t in value)):
            raise UserError(f"{where}: prompt_token_ids must be a non-empty list of integers")
        if kind == "messages" and not (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
            raise UserError(f"{where}: messages must be a list of {{\"role\", \"content\"}} objects")
        try:
            SamplingParams(**{k: req[k] for k in _PARAM_KEYS if k in req})
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        out.append(req)
    if not out:
        raise UserError(f"input {p} holds no requests")
    return out


def generate(engine_dir: str, input_path: str, output_path: str, show_progress: bool = True) -> None:
    from launch.local_spawn import run_ranks
    from workers.engine_files import read_engine_meta
    meta = read_engine_meta(engine_dir)
    requests = read_requests(input_path)
    prepared = prepare_requests(meta, requests, input_path)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_ranks(meta.world_size, generate_rank, str(engine_dir), prepared, str(out), show_progress, tp=meta.tp)


def prepare_requests(meta, requests: list[dict], where: str) -> list[tuple[list[int], dict]]:
    """Tokenize and check every request before any rank starts, so bad input fails in one line."""
    from orchestrator.engine_loop import check_prompt
    tokenizer = None
    if any("prompt_token_ids" not in r for r in requests):
        if not meta.has_tokenizer:
            raise UserError(f"engine {meta.dir} has no tokenizer: give prompt_token_ids instead of text")
        from orchestrator.tokenizer import Tokenizer
        tokenizer = Tokenizer(meta.dir)
    out = []
    for i, req in enumerate(requests):
        params = {k: req[k] for k in _PARAM_KEYS if k in req}
        if "prompt_token_ids" in req:
            ids = req["prompt_token_ids"]
        elif "messages" in req:
            ids = tokenizer.encode_chat(req["messages"])
        else:
            ids = tokenizer.encode(req["prompt"])
        try:
            check_prompt(meta, ids, SamplingParams(**params))
        except UserError as err:
            raise UserError(f"{where}: request {i + 1}: {err}") from None
        out.append((ids, params))
    return out


def generate_rank(env, engine_dir: str, requests: list, output_path: str, show_progress: bool) -> None:
    """The program every rank runs; rank 0 also schedules and writes the output."""
    from orchestrator.rank_program import run_on_mesh
    run_on_mesh(env, engine_dir, lambda runner, meta, broadcast:
                _drive(runner, meta, broadcast, requests, output_path, show_progress))


def _drive(runner, meta, broadcast, requests, output_path, show_progress) -> None:
    from tqdm import tqdm

    from orchestrator.engine_loop import EngineLoop
    from orchestrator.request_text import RequestText
    from orchestrator.tokenizer import Tokenizer
    tokenizer = Tokenizer(meta.dir) if meta.has_tokenizer else None
    loop = EngineLoop(runner, meta, broadcast, tokenizer)
    seqs = [loop.add_request(ids, SamplingParams(**params)) for ids, params in requests]
    texts = {id(s): RequestText(tokenizer, s.params, s.prompt_ids) for s in seqs} if tokenizer else {}
    token_ids: dict[int, list[int]] = {id(s): [] for s in seqs}
    reasons: dict[int, str] = {}
    start, tokens = time.time(), 0
    bar = tqdm(total=len(seqs), unit="req", desc="generating", disable=not show_progress)
    while loop.has_work():
        for out in loop.step():
            key = id(out.seq)
            if key in reasons:
                continue
            token_ids[key].append(out.token_id)
            reason = out.seq.finish_reason if out.finished else None
            if key in texts:
                reason = texts[key].add(out.token_id, reason).finish_reason
                if reason is not None and not out.finished:  # a stop string: the engine drops the rest
                    loop.scheduler.finish(out.seq, reason)
            if reason is not None:
                reasons[key] = reason
                tokens += len(token_ids[key])
                bar.update(1)
                bar.set_postfix_str(f"{tokens / max(1e-9, time.time() - start):.1f} tok/s")
    bar.close()
    tmp = Path(output_path + ".partial")
    with tmp.open("w") as f:
        for i, seq in enumerate(seqs):
            key = id(seq)
            row = {"index": i, "text": texts[key].text if key in texts else None, "token_ids": token_ids[key],
                   "finish_reason": reasons[key]}
            if seq.first_logits is not None:
                row["logits"] = seq.first_logits
            f.write(json.dumps(row) + "\n")
    tmp.rename(output_path)
