"""Scheduling ahead (the next plan goes out before the host has the tokens it feeds) changes when
steps run, never what they compute: on CPU ranks (MESHSERVE_SCHEDULE_AHEAD=1) every output equals
the step-by-step run's, across sampling settings, early stops, chunked prompts, queueing and
preemption, and a request whose sampling needs its tokens on the host holds the schedule back; a
grammar's masks are made once the step before has finished, just before the step samples."""
from __future__ import annotations

import json
import random

import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve, read_jsonl, write_jsonl


GRAMMARS = [{"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
            {"guided_regex": "[a-z]{2,9}( [0-9]+)?"}, {"guided_choice": ["yes", "no", "maybe not"]}]


def _requests(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(14):
        row = {"prompt_token_ids": [rng.randrange(3, 101) for _ in range(rng.randint(1, 40))],
               "max_tokens": rng.randint(1, 20), "ignore_eos": rng.random() < 0.5}
        kind = i % 5
        if kind == 0:
            row["temperature"] = 0
        elif kind == 1:
            row.update(temperature=0.9, top_k=rng.randint(1, 50), top_p=0.9, seed=rng.randrange(1 << 30))
        elif kind == 2:
            row.update(temperature=0.7, seed=rng.randrange(1 << 30), logit_bias={"5": 4.0, "9": -50})
        elif kind == 3:  # stops on any of a seventh of the vocabulary: early, at varied steps
            row.update(temperature=0.8, seed=rng.randrange(1 << 30), stop_token_ids=list(range(3, 101, 7)))
        else:  # penalties read the history on the host: this request holds the schedule back
            row.update(temperature=0.8, seed=rng.randrange(1 << 30), presence_penalty=0.5)
        if i % 3 == 1:  # a grammar's mask needs the token too, but only at sampling time
            row.update(GRAMMARS[(i // 3) % len(GRAMMARS)])
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ahead")
    hf = write_llama_with_demo_tokenizer(tmp / "hf", seed=11)  # a real tokenizer: grammars
    out = tmp / "tp2"
    meshserve("build", "--model", hf, "--tp", 2, "--dtype", "float32", "--out", out, "--max-seq-len", 96,
              "--kv-block-size", 8, "--quiet")
    return out


@pytest.mark.parametrize("limits", [["--max-num-tokens", "24", "--max-batch-size", "4"],
                                    ["--num-kv-blocks", "14", "--max-batch-size", "6"]],
                         ids=["chunked-and-queued", "preempting"])
def test_ahead_gives_the_step_by_step_outputs(engine, tmp_path, limits):
    requests = write_jsonl(tmp_path / "in.jsonl", _requests(len(limits)))
    outputs = {}
    for ahead in ("0", "1"):
        out = tmp_path / f"out{ahead}.jsonl"
        meshserve("generate", "--engine", engine, "--input", requests, "--output", out, "--quiet", *limits,
                  env={"MESHSERVE_SCHEDULE_AHEAD": ahead})
        outputs[ahead] = read_jsonl(out)
    assert len(outputs["1"]) == len(outputs["0"]) == 14
    for step_by_step, ahead in zip(outputs["0"], outputs["1"], strict=True):
        assert ahead == step_by_step
    assert {row["finish_reason"] for row in outputs["1"]} == {"stop", "length"}
    choices = [o["text"] for o, r in zip(outputs["1"], _requests(len(limits))) if "guided_choice" in r]
    assert choices and set(choices) <= {"yes", "no", "maybe not"}, choices


def test_bench_counts_the_rows_scheduled_ahead(engine, tmp_path):
    counts = {}
    for ahead in ("0", "1"):
        out = tmp_path / f"lat{ahead}.json"
        meshserve("bench", "latency", "--engine", engine, "--batch", 2, "--input-len", 8, "--output-len", 12,
                  "--out", out, env={"MESHSERVE_SCHEDULE_AHEAD": ahead})
        counts[ahead] = json.loads(out.read_text())["decode_rows_scheduled_ahead"]
    # every decode row but the first step's (fed by the prompt step in flight) and the last goes ahead
    assert counts == {"0": 0, "1": 2 * (12 - 2)}, counts


def test_a_bad_setting_is_refused(engine, tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", _requests(0)[:1])
    proc = meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "o.jsonl",
                     "--quiet", check=False, env={"MESHSERVE_SCHEDULE_AHEAD": "yes"})
    assert proc.returncode != 0 and "MESHSERVE_SCHEDULE_AHEAD='yes'" in proc.stderr, proc.stderr
