"""The `meshserve` command: build engines, generate from them, serve them."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from contextlib import nullcontext
from pathlib import Path

from meshserve.errors import UserError


def _build(args) -> None:
    from meshserve.orchestrator.config import EngineConfig, ParallelConfig, load_config
    from meshserve.orchestrator.engine_resolve import build_from
    if args.config:
        cfg = load_config(args.config)
        parallel, engine, source = cfg.parallel, cfg.engine, cfg.model.source
        out = args.out or cfg.model.engine_dir
    else:
        parallel = ParallelConfig(tp=args.tp, pp=args.pp)
        engine = EngineConfig(dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                              max_num_tokens=args.max_num_tokens, kv_block_size=args.kv_block_size)
        source, out = args.model, args.out
    dummy = args.load_format == "dummy"
    if args.shape and not dummy:
        raise UserError("--shape needs --load-format dummy (to write a random checkpoint to disk instead: "
                        "`meshserve random-checkpoint --shape NAME --out DIR`)")
    if args.shape and args.config:
        raise UserError("--shape replaces the config's model: give --shape with the flags, not with a config")
    if not source and not args.shape:
        raise UserError("no model given: pass --model DIR|FILE.gguf|demo (or a config with model.source)"
                        + (", or --shape NAME" if dummy else ""))
    if not out:
        raise UserError("no output folder given: pass --out DIR (or set model.engine_dir in the config)")
    from meshserve.launch.rank_env import launched_env
    from meshserve.launch.rank_sync import open_rank_group
    env = launched_env()  # under mpirun / srun every process builds its share of the rank files
    with open_rank_group(env) if env is not None and env.world_size > 1 else nullcontext() as group:
        if dummy:
            from meshserve.orchestrator.engine_resolve import resolve_source
            from meshserve.workers.build.engine_build import build_dummy_engine
            report = build_dummy_engine(resolve_source(source) if source else None, args.shape, out, parallel,
                                        engine, overwrite=args.overwrite, group=group)
        else:
            report = build_from(source, out, parallel, engine, group, jobs=args.jobs, overwrite=args.overwrite,
                                show_progress=not args.quiet)
    if group is not None and not group.is_lead:
        return
    gib = 1 << 30
    if dummy:
        def size(n: int) -> str:
            return f"{n / gib:.2f} GiB" if n >= gib else f"{n / (1 << 20):.2f} MiB"
        print(f"dummy engine written to {report.out_dir}: no rank files; each rank makes random weights at load "
              f"(largest rank {size(report.largest_rank_file_bytes)}, all ranks {size(sum(report.rank_file_bytes))})")
        return
    print(f"engine written to {report.out_dir} in {report.seconds:.1f}s; "
          f"peak memory {report.peak_rss_bytes / gib:.2f} GiB, largest rank file "
          f"{report.largest_rank_file_bytes / gib:.2f} GiB")


_LIMIT_FLAGS = ("max_batch_size", "max_num_tokens", "max_seq_len", "kv_block_size", "num_kv_blocks",
                "gpu_memory_fraction")


def _engine_and_limits(args, show_progress: bool = True):
    """The engine folder (a config's is built on first use), the config (or None) and the run-time
    limits: the flags, over the config's engine section, over the engine's own engine.json."""
    from meshserve.workers.engine_files import RuntimeLimits
    flags = {k: getattr(args, k) for k in _LIMIT_FLAGS}
    if not args.config:
        if not args.engine:
            raise UserError("no engine given: pass --engine DIR or a config file")
        return args.engine, None, RuntimeLimits(**flags)
    from meshserve.orchestrator.config import load_config
    from meshserve.orchestrator.engine_resolve import ensure_engine, runtime_limits
    cfg = load_config(args.config)
    return ensure_engine(cfg, show_progress=show_progress), cfg, runtime_limits(cfg, **flags)


def _generate(args) -> None:
    from meshserve.orchestrator.generate import generate
    engine, _, limits = _engine_and_limits(args, show_progress=not args.quiet)
    if bool(args.input) == bool(args.chat):
        raise UserError("give either --input FILE.jsonl or --chat TEXT")
    with tempfile.TemporaryDirectory() as tmp:
        input_path, output_path = args.input, args.output
        if args.chat:
            input_path = str(Path(tmp) / "in.jsonl")
            Path(input_path).write_text("".join(
                json.dumps({"messages": [{"role": "user", "content": c}], "temperature": 0,
                            "max_tokens": args.max_tokens}) + "\n" for c in args.chat))
        if not output_path:
            output_path = str(Path(tmp) / "out.jsonl")
        else:  # before any rank starts, not after the whole run
            from meshserve.orchestrator.generate import check_output_path
            check_output_path(output_path)
        _check_ray_args(args)
        if args.launcher == "ray":
            from meshserve.launch.ray_launcher import run_ranks_on_ray
            from meshserve.orchestrator.generate import generate_rank
            from meshserve.workers.engine_files import read_engine_meta
            meta = read_engine_meta(engine, limits)
            # actors do not share this process's working directory
            paths = [str(Path(p).resolve()) for p in (engine, input_path, output_path)]
            run_ranks_on_ray(meta.world_size, meta.tp, generate_rank, *paths, False, limits, address=args.ray_address,
                             gpus_per_rank=args.gpus_per_rank, cpus_per_rank=args.cpus_per_rank)
        else:
            generate(engine, input_path, output_path, show_progress=not args.quiet, limits=limits)
        from meshserve.launch.launched import is_lead
        if not is_lead():  # under a launcher rank 0 writes the results
            return
        if args.chat:
            for question, line in zip(args.chat, Path(output_path).read_text().splitlines()):
                print(f"> {question}\n{json.loads(line)['text']}")
        elif not args.output:
            sys.stdout.write(Path(output_path).read_text())


def _api_settings_to_env(args) -> None:
    """The HTTP front end's settings travel to rank 0 (wherever a launcher puts it) as MESHSERVE_*
    variables, which every launch path hands on (api_server.ApiSettings.from_env reads them)."""
    from meshserve.orchestrator.api_server import ApiSettings
    for name in ("max_request_bytes", "max_queued_requests", "max_queued_tokens"):
        value = getattr(args, name)
        if value is None:
            continue
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value} is not allowed: use an integer >= 1")
        os.environ[ApiSettings.ENV[name]] = str(value)
    if args.api_key is not None:
        if not args.api_key:
            raise UserError("--api-key is empty: give a key, or leave the flag out to serve without one")
        os.environ[ApiSettings.ENV["api_key"]] = args.api_key
    if args.chat_special_tokens_in_content:
        os.environ[ApiSettings.ENV["special_tokens_in_content"]] = "1"


_FAULT_FLAGS = {"step_timeout": "MESHSERVE_STEP_TIMEOUT", "first_step_timeout": "MESHSERVE_FIRST_STEP_TIMEOUT",
                "drain_timeout": "MESHSERVE_DRAIN_TIMEOUT"}


def _fault_settings_to_env(args) -> None:
    """The stall and drain timeouts reach every rank (wherever a launcher puts it) as MESHSERVE_*
    variables (workers.runtime.watchdog.FaultTimeouts.from_env reads them)."""
    from meshserve.workers.runtime.watchdog import FaultTimeouts
    for name, var in _FAULT_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not value > 0:
            raise UserError(f"--{name.replace('_', '-')}={value:g} is not allowed: use a number of seconds > 0")
        os.environ[var] = repr(float(value))
    FaultTimeouts.from_env()  # a bad value set in the environment fails here, before any rank starts


def _serve(args) -> None:
    from meshserve.orchestrator.serve import serve
    if args.restart_on_failure < 0:
        raise UserError(f"--restart-on-failure={args.restart_on_failure} is not allowed: use 0 or more")
    from meshserve.launch.rank_env import launched_env
    if args.restart_on_failure and launched_env() is not None:
        raise UserError("--restart-on-failure restarts ranks that `meshserve serve` starts itself (locally, or as Ray "
                        "actors with --launcher ray); under mpirun, srun or torchrun leave it out and use the "
                        "launcher's own restart policy")
    host, port, name = args.host, args.port, args.model_name
    _api_settings_to_env(args)
    _fault_settings_to_env(args)
    engine, cfg, limits = _engine_and_limits(args)
    if cfg is not None:
        host = host or cfg.server.host
        port = cfg.server.port if port is None else port
        name = name or cfg.model.name or None
    _check_ray_args(args)
    if args.launcher == "ray":
        from meshserve.launch.ray_launcher import serve_on_ray
        from meshserve.orchestrator.serve import serve_rank
        # bind the IP the cluster knows the serving node by (rank 0's, which may land on any node; with
        # --restart-on-failure, this process's) unless a non-loopback host was asked for
        ray_host = args.host or (host if host not in ("127.0.0.1", "localhost") else None)
        if args.restart_on_failure:  # this process is the front end, the ranks Ray actors it restarts
            serve(engine, ray_host, 8000 if port is None else port, name, limits, args.restart_on_failure,
                  ray=dict(address=args.ray_address, gpus_per_rank=args.gpus_per_rank,
                           cpus_per_rank=args.cpus_per_rank))
            return
        serve_on_ray(serve_rank, engine, ray_host, 8000 if port is None else port, name, limits,
                     address=args.ray_address, gpus_per_rank=args.gpus_per_rank, cpus_per_rank=args.cpus_per_rank)
        return
    serve(engine, host or "127.0.0.1", 8000 if port is None else port, name, limits, args.restart_on_failure)


def _bench(args) -> None:
    if args.mode == "serve":
        return _bench_serve(args)
    if args.mode == "allreduce":
        from meshserve.orchestrator.bench import _commit
        from meshserve.orchestrator.bench_allreduce import run_allreduce_bench
        if args.dtype not in ("bfloat16", "float16", "float32"):
            raise UserError(f"--dtype={args.dtype!r} is not allowed: use bfloat16, float16 or float32")
        run_allreduce_bench(2 if args.tp is None else args.tp, args.dtype, args.out, " ".join(["meshserve", *sys.argv[1:]]), _commit())
        return
    if args.mode == "gemv":
        from meshserve.orchestrator.bench import _commit
        from meshserve.orchestrator.bench_gemv import run_gemv_bench
        if args.dtype not in ("bfloat16", "float16"):
            raise UserError(f"--dtype={args.dtype!r} is not allowed for bench gemv: use bfloat16 or float16")
        run_gemv_bench(args.shape or "llama-3-8b", 1 if args.tp is None else args.tp, args.dtype, args.out,
                       " ".join(["meshserve", *sys.argv[1:]]), _commit())
        return
    if args.url:
        raise UserError(f"--url is for `meshserve bench serve`; `bench {args.mode}` starts the engine itself")
    from meshserve.orchestrator.bench import BenchSettings, run_bench
    engine, _, limits = _engine_and_limits(args)
    for name in ("batch", "input_len", "output_len", "num_prompts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: use an integer >= 1")
    settings = BenchSettings(args.mode, args.batch, args.input_len, args.output_len, args.num_prompts, args.seed,
                             args.profile, _bench_grammar(args.response_format))
    run_bench(engine, settings, args.out, " ".join(["meshserve", *sys.argv[1:]]), limits)


BENCH_SCHEMAS = {
    "json_object": {"type": "object"},
    "string_field": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
                     "additionalProperties": False},
}


def _bench_grammar(spec: str | None) -> dict | None:
    """--response-format: a named schema, a JSON Schema's text or @FILE holding one -> the grammar."""
    if spec is None:
        return None
    if spec in BENCH_SCHEMAS:
        return {"json_schema": BENCH_SCHEMAS[spec]}
    text = spec
    if spec.startswith("@"):
        try:
            text = Path(spec[1:]).read_text()
        except OSError as err:
            raise UserError(f"--response-format {spec}: cannot read the file ({err.strerror})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--response-format {spec[:60]!r} is neither {', '.join(BENCH_SCHEMAS)} nor JSON ({err}); "
                        "give a JSON Schema's text or @FILE") from None
    if not isinstance(schema, dict):
        raise UserError("--response-format: a JSON Schema is a JSON object")
    return {"json_schema": schema}


def _bench_serve(args) -> None:
    import json

    from meshserve.orchestrator.bench import _commit
    from meshserve.orchestrator.bench_serve import ServeBenchSettings, run_serve_bench
    if not args.url:
        raise UserError("bench serve needs the server's address: --url http://HOST:PORT")
    for name in ("input_len", "output_len", "num_prompts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: use an integer >= 1")
    if args.client_processes < 0 or args.client_processes > 64:
        raise UserError(f"--client-processes={args.client_processes} is not allowed: use 1 to 64, or 0 for one per "
                        "4 CPUs (1 to 4)")
    if args.rate is None or not (args.rate > 0):
        raise UserError(f"--rate={args.rate} is not allowed: give requests per second (> 0), or inf for all at once")
    meta = None
    if args.engine or args.config:
        from meshserve.workers.engine_files import read_engine_meta
        meta = read_engine_meta(_engine_and_limits(args, show_progress=False)[0])
    settings = ServeBenchSettings(args.url.rstrip("/"), args.rate, args.num_prompts, args.input_len, args.output_len,
                                  args.seed, args.model, args.api_key or os.environ.get("MESHSERVE_API_KEY"),
                                  meta.spec.vocab_size if meta else 1000, args.client_processes)
    out, report = run_serve_bench(settings, args.out, " ".join(["meshserve", *sys.argv[1:]]), _commit(), meta)
    print(json.dumps(report, indent=2), flush=True)
    print(f"meshserve: bench results written to {out}", flush=True)
    if (report["send_lag_ms_p99"] or 0) > 50:
        print(f"meshserve: the client sent 1% of requests over {report['send_lag_ms_p99']:.0f} ms late: its own "
              "load distorts the figures; give more --client-processes", file=sys.stderr, flush=True)
    if report["completed"] == 0:
        raise UserError(f"every request failed; the first: {report.get('first_error')}")


def _check(args) -> None:
    from meshserve.orchestrator.check import layout, run_check
    _check_ray_args(args)
    if not args.timeout > 0:
        raise UserError(f"--timeout={args.timeout:g} is not allowed: use a number of seconds > 0")
    tp, pp = layout(args.config, args.engine)
    ray = None if args.launcher != "ray" else dict(address=args.ray_address, gpus_per_rank=args.gpus_per_rank,
                                                   cpus_per_rank=args.cpus_per_rank)
    run_check(tp, pp, args.timeout, ray)


def _random_checkpoint(args) -> None:
    import torch

    from meshserve.workers.build.random_checkpoint import SHAPES, write_random_llama
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output {out} exists and is not empty; choose another --out")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    info = write_random_llama(out, dtype=dtypes[args.dtype], shard_bytes=4 << 30, seed=args.seed,
                              **SHAPES[args.shape])
    print(f"{args.shape}: {info['parameters'] / 1e9:.2f}B random parameters ({args.dtype}) written to {out}")


def _check_ray_args(args) -> None:
    if args.launcher != "ray":
        for flag in ("ray_address", "gpus_per_rank"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs --launcher ray")


def _launcher_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--launcher", choices=["auto", "ray"], default="auto",
                   help="auto: the launcher that started us, else local processes; ray: one Ray actor per rank")
    p.add_argument("--ray-address", help="with --launcher ray: 'auto' or HOST:PORT of a running cluster "
                   "(default: RAY_ADDRESS if set, else a local cluster for this run)")
    p.add_argument("--gpus-per-rank", type=float, choices=[0, 1], help="with --launcher ray: 1 or 0 "
                   "(default: 1 when the cluster has a GPU per rank)")
    p.add_argument("--cpus-per-rank", type=float, default=1.0, help="with --launcher ray (default 1)")
    return p


def _engine_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The two ways to name what to run: a YAML config (built on first use) or an engine folder."""
    p.add_argument("config", nargs="?", help="a YAML config; builds the engine on first use")
    p.add_argument("--engine", help="a built engine directory")
    limits = p.add_argument_group("run-time limits (default: the config's engine section, else the engine's "
                                  "engine.json)")
    limits.add_argument("--max-batch-size", type=int, help="most sequences in flight")
    limits.add_argument("--max-num-tokens", type=int, help="most tokens in one step")
    limits.add_argument("--max-seq-len", type=int, help="longest prompt + output")
    limits.add_argument("--kv-block-size", type=int, help="tokens per KV-cache block")
    limits.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks per rank (default: enough for "
                        "max-batch-size full sequences, capped by free GPU memory)")
    limits.add_argument("--gpu-memory-fraction", type=float,
                        help="of the GPU memory free once the weights are loaded, the share the KV cache and the "
                        "steps may take (default 0.9)")
    return p


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meshserve", description="Serve Llama models across a TP x PP rank mesh.")
    sub = ap.add_subparsers(dest="command", required=True)
    from meshserve.workers.build.random_checkpoint import SHAPES
    b = sub.add_parser("build", help="shard a checkpoint into per-rank engine files",
                       epilog="--load-format dummy writes config.json and engine.json only, no rank files: each "
                       "rank makes random weights of the same names, shapes and dtype on its device at load, "
                       "so any size can be benchmarked without a checkpoint (output tokens are meaningless). "
                       "Sizes come from --shape NAME or from --model (only its config.json or GGUF header is "
                       "read). Example: meshserve build --shape llama-3-70b --load-format dummy --tp 2 "
                       "--out ./engines/l70b-dummy")
    b.add_argument("config", nargs="?", help="a YAML config (instead of the flags below)")
    b.add_argument("--model", help="Hugging Face Llama directory, .gguf file, or 'demo'")
    b.add_argument("--load-format", choices=["safetensors", "dummy"], default="safetensors",
                   help="safetensors (default): write the weights into rank files; dummy: no rank files, "
                   "random weights made at load (see below)")
    b.add_argument("--shape", help=f"with --load-format dummy, instead of --model: one of {', '.join(sorted(SHAPES))}")
    b.add_argument("--out", help="engine directory to write")
    b.add_argument("--tp", type=int, default=1)
    b.add_argument("--pp", type=int, default=1)
    b.add_argument("--dtype", default="bfloat16", help="float32, float16 or bfloat16")
    b.add_argument("--max-batch-size", type=int, default=16)
    b.add_argument("--max-seq-len", type=int, default=2048)
    b.add_argument("--max-num-tokens", type=int, default=4096)
    b.add_argument("--kv-block-size", type=int, default=16)
    b.add_argument("--jobs", type=int, default=None, help="rank files built at once (default: CPU count)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_build)
    g = _engine_args(sub.add_parser("generate", help="offline generation from a JSONL file"))
    g.add_argument("--input", help="JSONL requests, one {\"prompt\": ...} per line")
    g.add_argument("--output", help="JSONL results (default: standard output)")
    g.add_argument("--chat", action="append", help="a user message answered greedily (repeatable)")
    g.add_argument("--max-tokens", type=int, default=64, help="with --chat")
    g.add_argument("--quiet", action="store_true")
    _launcher_args(g)
    g.set_defaults(func=_generate)
    s = _engine_args(sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API"))
    s.add_argument("--host", help="address to bind (default 127.0.0.1; with --launcher ray: rank 0's node IP, or "
                   "with --restart-on-failure this process's)")
    s.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--model-name", help="the model id clients use (default: the engine folder name)")
    guard = s.add_argument_group("request limits and access")
    guard.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' on every route but "
                       "/health and /ready (default: $MESHSERVE_API_KEY; unset: no key)")
    guard.add_argument("--max-request-bytes", type=int, help="largest request body; larger ones get 413 "
                       "(default 8 MiB)")
    guard.add_argument("--max-queued-requests", type=int, help="requests waiting for their first token; "
                       "more get 429 with Retry-After (default 256)")
    guard.add_argument("--max-queued-tokens", type=int, help="prompt tokens of the requests waiting for their "
                       "first token; more get 429 (default 1048576)")
    guard.add_argument("--chat-special-tokens-in-content", action="store_true",
                       help="let chat message text spell the template's control tokens (e.g. <|im_start|>); "
                       "by default such text stays plain text")
    faults = s.add_argument_group("faults and shutdown")
    faults.add_argument("--step-timeout", type=float, help="seconds a step may take, and a rank may go without a "
                        "heartbeat, before the mesh counts as stalled: open requests fail, /health turns 503 and "
                        "the server exits naming the rank (default 30; $MESHSERVE_STEP_TIMEOUT)")
    faults.add_argument("--first-step-timeout", type=float, help="the same for the first step, which may compile "
                        "or capture graphs (default 300; $MESHSERVE_FIRST_STEP_TIMEOUT)")
    faults.add_argument("--drain-timeout", type=float, help="on SIGINT/SIGTERM, seconds the requests in progress "
                        "may take to finish before they are ended with an error (default 30; "
                        "$MESHSERVE_DRAIN_TIMEOUT)")
    faults.add_argument("--restart-on-failure", type=int, default=0, metavar="N",
                        help="ranks started here (no launcher, or --launcher ray: then this process is the HTTP "
                        "front end and the ranks are Ray actors): when a rank dies or the mesh stalls, start the "
                        "ranks again, up to N times, and send every unfinished request again; one that had streamed "
                        "tokens goes on if its sampling is reproducible (greedy or seeded), else ends with an error "
                        "(default 0). Under mpirun/srun/torchrun the job's own restart policy applies")
    _launcher_args(s)
    s.set_defaults(func=_serve)
    be = _engine_args(sub.add_parser("bench", help="latency or throughput of an engine, a running server "
                                     "under load (serve), the TP all-reduce (allreduce) or the decode linears (gemv); writes JSON results"))
    be.add_argument("mode", choices=["latency", "throughput", "serve", "allreduce", "gemv"])
    be.add_argument("--batch", type=int, default=1, help="latency: requests decoded together (default 1)")
    be.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    be.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    be.add_argument("--num-prompts", type=int, default=256, help="throughput: requests in all (default 256)")
    be.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    be.add_argument("--profile", action="store_true",
                    help="also write a torch.profiler table of the measured round (OUT with .profile.txt)")
    be.add_argument("--out", help="JSON file to write (default: benchmarks/results/MODE-ENGINE-LAYOUT-DATE.json)")
    be.add_argument("--response-format", metavar="SPEC",
                    help="latency/throughput: every request follows a grammar: 'json_object', 'string_field' (an "
                    "object with one string field, which random weights rarely close), or a JSON Schema (its JSON "
                    "text, or @FILE)")
    be.add_argument("--url", help="serve: the server to load, http://HOST:PORT")
    be.add_argument("--rate", type=float, help="serve: requests per second, Poisson arrivals (inf: all at once)")
    be.add_argument("--model", help="serve: the model id to ask for (default: the server's first)")
    be.add_argument("--api-key", help="serve: the server's API key (default: MESHSERVE_API_KEY)")
    be.add_argument("--client-processes", type=int, default=0, help="serve: processes sending the requests "
                    "(default 0: one per 4 CPUs, 1 to 4; one Python client streams ~9,000 tokens/s at most)")
    be.add_argument("--tp", type=int, help="allreduce: GPUs in the TP group (default 2); gemv: the TP degree "
                    "whose per-rank linears to time (default 1)")
    be.add_argument("--dtype", default="bfloat16", help="allreduce, gemv: element type (default bfloat16)")
    be.add_argument("--shape", choices=sorted(SHAPES), help="gemv: the model shape (default llama-3-8b)")
    be.set_defaults(func=_bench)
    ck = sub.add_parser("check", help="can the mesh form here? every rank's host, addresses and interfaces; "
                        "reachability of every peer and one collective per group, each with a deadline")
    ck.add_argument("config", nargs="?", help="a YAML config (its engine need not be built yet)")
    ck.add_argument("--engine", help="a built engine directory")
    ck.add_argument("--timeout", type=float, default=5.0, help="seconds each step may take (default 5)")
    _launcher_args(ck)
    ck.set_defaults(func=_check)
    rc = sub.add_parser("random-checkpoint", help="write a random-weight Llama checkpoint of a named shape")
    rc.add_argument("--shape", required=True, choices=sorted(SHAPES))
    rc.add_argument("--out", required=True, help="folder to write (config.json + safetensors shards)")
    rc.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    rc.add_argument("--seed", type=int, default=0)
    rc.set_defaults(func=_random_checkpoint)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from meshserve.launch import launched
    env = None
    try:
        env = launched.enter(args.command)
        args.func(args)
    except UserError as err:
        if not err.quiet:
            print(f"meshserve: error: {launched.rank_prefix(env)}{err}", file=sys.stderr, flush=True)
        return launched.leave(env, 2, err)
    except KeyboardInterrupt:
        print(f"meshserve: {launched.rank_prefix(env)}interrupted", file=sys.stderr)
        return launched.leave(env, 130)
    except Exception as err:
        if env is None:
            raise
        traceback.print_exc()
        return launched.leave(env, 1, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
