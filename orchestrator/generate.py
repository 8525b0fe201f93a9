"""`meshserve generate`: JSONL prompts in, JSONL completions out, through the rank mesh.

Input lines: {"prompt": str} | {"prompt_token_ids": [int]} | {"messages": [...]}, with optional
max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, presence_penalty,
frequency_penalty, repetition_penalty, ignore_eos, return_logits. Output lines, in input order:
{"index", "text", "token_ids", "finish_reason"} (+ "logits" when asked).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import SamplingParams

_PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")
_PARAM_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
               "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "return_logits",
               "logit_bias")
_GRAMMAR_KEYS = ("response_format", "guided_json", "guided_regex", "guided_choice")  # as over HTTP


def _params(req: dict) -> dict:
    """SamplingParams fields of one request line (a grammar given the HTTP API's way becomes
    `structured`); raises UserError."""
    params = {k: req[k] for k in _PARAM_KEYS if k in req}
    if any(k in req for k in _GRAMMAR_KEYS):
        from meshserve.orchestrator.openai_protocol import RequestError, structured_output
        try:
            params["structured"], _ = structured_output(req)
        except RequestError as err:
            raise UserError(str(err)) from None
    return params


def read_requests(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input {p} does not exist; pass a JSONL file with one {{\"prompt\": ...}} per line")
    out = []
    for n, raw in enumerate(p.read_bytes().splitlines(), 1):
        where = f"{p}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                            "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        surrogate = _lone_surrogate(req)
        if surrogate:
            raise UserError(f"{where}: {surrogate}; text must be valid Unicode (a \\ud800-\\udfff escape "
                            "needs its pair)")
        if not isinstance(req, dict):
            raise UserError(f"{where}: each line must be a JSON object")
        given = [k for k in _PROMPT_KEYS if k in req]
        if len(given) != 1:
            raise UserError(f"{where}: give exactly one of {', '.join(_PROMPT_KEYS)}")
        unknown = sorted(set(req) - set(_PROMPT_KEYS) - set(_PARAM_KEYS) - set(_GRAMMAR_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(_PROMPT_KEYS + _PARAM_KEYS + _GRAMMAR_KEYS)}")
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
            SamplingParams(**_params(req))
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        out.append(req)
    if not out:
        raise UserError(f"input {p} holds no requests")
    return out


def _lone_surrogate(value, path: str = "") -> str | None:
    """Where a JSON value holds a string with an unpaired surrogate escape (such text cannot be
    tokenized nor written back as UTF-8), else None."""
    if isinstance(value, str):
        for i, ch in enumerate(value):
            if "\ud800" <= ch <= "\udfff":
                return f"{path or 'a string'} holds a lone surrogate U+{ord(ch):04X} at character {i + 1}"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key):
            return f"a key of {path or 'the request'} holds a lone surrogate"
        found = _lone_surrogate(item, f"{path}.{key}" if path and isinstance(key, str) else
                                f"{path}[{key}]" if path else str(key))
        if found:
            return found
    return None


def check_output_path(output_path: str) -> None:
    """Refuse, before any rank starts, an output that cannot be written (a folder, a missing or
    read-only parent)."""
    out = Path(output_path)
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give a file name, e.g. {out / 'out.jsonl'}")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--output {out}: {parent} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # a probe of this process's own (every launched rank checks, at the same time)
        probe = parent / f".{out.name}.{os.getpid()}.probe"
        with probe.open("a"):
            pass
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise UserError(f"--output {out} cannot be written ({err.strerror or err})") from None


def generate(engine_dir: str, input_path: str, output_path: str, show_progress: bool = True, limits=None) -> None:
    """Every request is checked before any rank starts; rank 0 writes the results (in input order).
    limits: a workers.engine_files.RuntimeLimits (None: engine.json's)."""
    from meshserve.orchestrator.llm import LLM
    from meshserve.workers.engine_files import read_engine_meta
    meta = read_engine_meta(engine_dir, limits)
    requests = read_requests(input_path)
    prepared = prepare_requests(meta, requests, input_path)
    check_output_path(output_path)
    with LLM(engine_dir, show_progress=show_progress, limits=limits) as llm:
        results = llm.generate_ids([ids for ids, _ in prepared], [SamplingParams(**p) for _, p in prepared])
        if not llm.is_driver:
            return
    write_results(results, output_path)


def write_results(results, output_path: str) -> None:
    """Write the output lines through a `.partial` file renamed at the end; a failed write (a full
    disk) leaves nothing behind and says so."""
    tmp = Path(output_path + ".partial")
    try:
        with tmp.open("w") as f:
            for r in results:
                row = {"index": r.index, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
                if r.error is not None:
                    row["error"] = r.error
                if r.first_logits is not None:
                    row["logits"] = r.first_logits
                f.write(json.dumps(row) + "\n")
        tmp.rename(output_path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--output {output_path} could not be written ({err.strerror or err}); the results of "
                        f"{len(results)} request(s) are lost: free space there, or choose another --output, "
                        "and run again") from None


def prepare_requests(meta, requests: list[dict], where: str) -> list[tuple[list[int], dict]]:
    """Tokenize and check every request before any rank starts, so bad input fails in one line."""
    from meshserve.orchestrator.engine_loop import check_prompt
    tokenizer = None
    if any("prompt_token_ids" not in r for r in requests):
        if not meta.has_tokenizer:
            raise UserError(f"engine {meta.dir} has no tokenizer: give prompt_token_ids instead of text")
        from meshserve.orchestrator.tokenizer import Tokenizer
        tokenizer = Tokenizer(meta.dir)
    out = []
    for i, req in enumerate(requests):
        params = _params(req)
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


def generate_rank(env, engine_dir: str, input_path: str, output_path: str, show_progress: bool, limits=None) -> None:
    """One rank of `generate` started by a launcher that runs a function per rank (Ray): the LLM finds
    its rank in the environment; rank 0 writes the output."""
    generate(engine_dir, input_path, output_path, show_progress, limits)
