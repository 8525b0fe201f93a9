"""`meshserve generate` on bad input fails in one line, before any rank starts, naming what and where:
a line that is not UTF-8, a lone surrogate escape, an --output that is a folder; a damaged rank file is
blamed on its rank and file, without tracebacks (a real tp=1 x pp=2 engine)."""
from __future__ import annotations

import shutil

import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve

GOOD = b'{"prompt_token_ids": [5, 6, 7], "max_tokens": 4, "temperature": 0}\n'


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-errors")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    out = root / "engine"
    meshserve("build", "--model", hf, "--pp", 2, "--dtype", "float32", "--out", out, "--max-seq-len", 256,
              "--max-batch-size", 4, "--quiet")
    return out


def failing(*args) -> str:
    proc = meshserve("generate", *args, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_a_line_that_is_not_utf8_is_refused_with_its_line_number(engine, tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(GOOD + b'{"prompt": "caf\xe9 au lait"}\n')
    err = failing("--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl")
    assert f"meshserve: error: {requests}:2: not valid UTF-8 (byte 0xe9 at column 16)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("line,expected", [
    (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}\n',
     ":2: messages[0].content holds a lone surrogate U+D800 at character 4"),
    (b'{"prompt": "a\\udc00"}\n', ":2: prompt holds a lone surrogate U+DC00 at character 2"),
    (b'{"prompt": "ok", "stop": ["\\ud83d"]}\n', ":2: stop[0] holds a lone surrogate U+D83D at character 1"),
])
def test_a_lone_surrogate_is_refused_with_its_line_number(tmp_path, line, expected):
    from meshserve.errors import UserError
    from meshserve.orchestrator.generate import read_requests
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(GOOD + line)
    with pytest.raises(UserError) as err:
        read_requests(requests)
    assert str(err.value).startswith(f"{requests}{expected}"), err.value
    read_requests_ok = tmp_path / "ok.jsonl"  # a proper pair is fine
    read_requests_ok.write_bytes(b'{"prompt": "\\ud83d\\ude00"}\n')
    assert read_requests(read_requests_ok) == [{"prompt": "\U0001F600"}]


def test_output_that_is_a_folder_is_refused_before_any_rank_starts(engine, tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(GOOD)
    folder = tmp_path / "results"
    folder.mkdir()
    err = failing("--engine", engine, "--input", requests, "--output", folder)
    assert f"meshserve: error: --output {folder} is a folder" in err, err
    assert "generating" not in err and "rank" not in err, err  # no rank was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "results"]
    assert list(folder.iterdir()) == []


def test_truncated_rank_file_names_its_rank_and_file(engine, tmp_path):
    damaged = tmp_path / "engine"
    shutil.copytree(engine, damaged)
    rank_file = damaged / "rank1.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[: rank_file.stat().st_size // 2])
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(GOOD)
    err = failing("--engine", damaged, "--input", requests, "--output", tmp_path / "out.jsonl")
    assert f"meshserve: error: rank 1: cannot load the weights from {rank_file} (" in err, err
    assert "meshserve: error: rank 1 of 2 exited with code 2" in err, err
    assert "rank 0 of 2 exited" not in err, err
    assert not list(tmp_path.glob("out.jsonl*"))


def test_logit_bias_and_grammars_work_offline_as_over_http(engine, tmp_path):
    """A JSONL line takes `logit_bias` and the HTTP API's grammar fields; a bad grammar is refused
    with its line number before any rank starts."""
    import json

    from tests.conftest import read_jsonl, write_jsonl
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
         "logit_bias": {"1234": 100}},
        {"prompt": "Pick one", "max_tokens": 8, "temperature": 0, "guided_choice": ["yes", "no"]},
        {"prompt": "As JSON", "max_tokens": 32, "temperature": 0,
         "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet")
    bias, choice, as_json = read_jsonl(tmp_path / "out.jsonl")
    assert bias["token_ids"] == [1234, 1234, 1234], bias
    assert choice["text"] in ("yes", "no") and choice["finish_reason"] == "stop", choice
    assert as_json["finish_reason"] == "stop" and isinstance(json.loads(as_json["text"])["ok"], bool), as_json
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b'{"prompt": "x", "guided_regex": ""}\n')
    said = failing("--engine", engine, "--input", bad, "--output", tmp_path / "o.jsonl")
    assert f"{bad}:2:" in said and "guided_regex" in said, said


def test_an_output_that_cannot_be_written_in_full_says_so_and_leaves_nothing(tmp_path):
    """A disk that fills while the results are written (here: a file size limit, which fails the
    same write): one line naming the file and the cause, exit 2, no `.partial` left."""
    import subprocess
    import sys
    out = tmp_path / "out.jsonl"
    script = ("import resource, signal, sys\n"
              "from meshserve.orchestrator.generate import write_results\n"
              "from meshserve.orchestrator.llm import RequestOutput\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              "rows = [RequestOutput(i, [1], 'x' * 100, [5] * 20, 'length') for i in range(100)]\n"
              "try:\n"
              f"    write_results(rows, {str(out)!r})\n"
              "except Exception as err:\n"
              "    print(type(err).__name__, err)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"UserError --output {out} could not be written (File too large); the results "
                                  "of 100 request(s) are lost: free space there, or choose another --output"), proc.stdout
    assert list(tmp_path.iterdir()) == []
