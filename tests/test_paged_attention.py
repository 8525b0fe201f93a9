"""The batched paged-attention kernel agrees with the reference attention: on random packed batches
(run by Triton's interpreter on CPU, natively on GPU), inside a whole engine, and with the padded
decode batches the CUDA graphs run."""
from __future__ import annotations

import random

import pytest
import torch

from meshserve.workers.runtime.attention_reference import reference_attention
from meshserve.workers.runtime.step_inputs import StepBuffers
from meshserve.workers.runtime.rank_protocol import StepPlan
from tests.checkpoints import TINY, write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_batch(rng: random.Random, heads: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype=torch.float32, num_blocks: int = 48):
    """A pool holding random keys, and a packed batch of sequences: prompts (the whole context
    new), prefix-cache hits and chunks (some of the context cached), and decode rows (one new)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    pool = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype) for _ in "kv"]
    b = rng.randint(1, 5)
    ctx = [rng.randint(1, 90) for _ in range(b)]
    kind = [rng.choice(["prompt", "partial", "decode"]) for _ in range(b)]
    qlens = [c if k == "prompt" else (rng.randint(1, c) if k == "partial" else 1) for c, k in zip(ctx, kind)]
    width = max(-(-c // block_size) for c in ctx)
    if b * width > num_blocks - 1:
        return random_batch(rng, heads, kv_heads, head_dim, block_size, dtype, num_blocks)
    order = list(range(1, num_blocks))  # block 0 is the scratch block: never in a table
    rng.shuffle(order)
    tables = torch.tensor(order[: b * width]).view(b, width)
    q = torch.randn(sum(qlens), heads, head_dim, generator=g).to(DEVICE, dtype)
    return q, pool, qlens, ctx, tables


def inputs_of(qlens, ctx, tables, max_tokens: int = 512):
    plan = StepPlan(torch.zeros(sum(qlens), dtype=torch.int64), torch.zeros(sum(qlens), dtype=torch.int64),
                    torch.zeros(sum(qlens), dtype=torch.int64), torch.tensor(qlens), torch.tensor(ctx), tables,
                    *[torch.zeros(len(qlens), dtype=torch.int64)] * 2, torch.zeros(len(qlens), 0, dtype=torch.int64),
                    torch.zeros(len(qlens), dtype=torch.int64), *[torch.zeros(len(qlens))] * 6)
    return StepBuffers(max_tokens, 8, tables.shape[1] + 2, DEVICE).fill(plan)


SHAPES = [  # heads, kv_heads, head_dim, block_size: GQA groups 1-8, head dims that are no power of two
    (8, 2, 32, 16), (6, 6, 24, 4), (4, 1, 64, 16), (12, 4, 80, 8), (2, 2, 16, 32), (9, 3, 64, 16),
    (32, 8, 128, 16), (8, 1, 12, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}kv{}d{}bs{}".format(*s))
def test_kernel_matches_reference_fp32(shape):
    from meshserve.workers.runtime.paged_attention import paged_attention
    rng = random.Random(hash(shape) & 0xFFFF)
    for _ in range(3):
        q, (k, v), qlens, ctx, tables = random_batch(rng, *shape)
        step = inputs_of(qlens, ctx, tables)
        got = paged_attention(q, k, v, step.query_start, step.seq_lens, step.block_tables, step.max_query_len)
        want = reference_attention(q, k, v, step)
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err < 1e-5, f"qlens={qlens} ctx={ctx}: max error {err}"


@pytest.mark.parametrize("shape", SHAPES[:6], ids=lambda s: "h{}kv{}d{}bs{}".format(*s))
def test_split_decode_matches_reference_fp32(shape):
    """Decode-only steps split each context into chunks (few sequences x KV heads): any batch size,
    contexts shorter than the split count, and contexts crossing many blocks."""
    from meshserve.workers.runtime.paged_attention import decode_splits, paged_attention
    heads, kv_heads, head_dim, block_size = shape
    rng = random.Random(hash(shape) & 0xFFF)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    num_blocks = 200
    k, v = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE) for _ in "kv"]
    for _ in range(2):
        b = rng.choice([1, 2, 3, 5, 8])
        ctx = [rng.choice([1, 2, rng.randint(3, 40), rng.randint(41, 150)]) for _ in range(b)]
        width = max(-(-c // block_size) for c in ctx)
        tables = torch.randint(1, num_blocks, (b, width), generator=g)
        q = torch.randn(b, heads, head_dim, generator=g).to(DEVICE)
        step = inputs_of([1] * b, ctx, tables)
        assert decode_splits(b, kv_heads) > 1
        want = reference_attention(q, k, v, step)
        for known in (None, max(ctx)):  # graphs know no context lengths; eager steps cap the splits
            got = paged_attention(q, k, v, step.query_start, step.seq_lens, step.block_tables, 1, max_context=known)
            err = (got - want).abs().max().item()
            assert err < 1e-5, f"ctx={ctx} max_context={known}: max error {err}"


def test_kernel_half_precision_within_rounding():
    """bfloat16 on GPU; float16 under the interpreter, whose tl.dot mishandles bfloat16."""
    from meshserve.workers.runtime.paged_attention import paged_attention
    rng = random.Random(5)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    for shape in SHAPES[:4]:
        q, (k, v), qlens, ctx, tables = random_batch(rng, *shape, dtype=dtype)
        step = inputs_of(qlens, ctx, tables)
        got = paged_attention(q, k, v, step.query_start, step.seq_lens, step.block_tables, step.max_query_len)
        want = reference_attention(q.float(), k.float(), v.float(), step)
        err = (got.float() - want).abs().max().item()
        assert err < 3e-2, f"{shape}: max error {err} (half precision keeps ~3 significant digits)"


def test_kernel_sees_no_future_and_no_other_sequence():
    """Change a key past a query's position, or in another sequence's blocks: that query's output stays."""
    from meshserve.workers.runtime.paged_attention import paged_attention
    rng = random.Random(11)
    q, (k, v), _, _, _ = random_batch(rng, 4, 2, 16, 4)
    qlens, ctx = [6, 3], [10, 3]
    tables = torch.tensor([[1, 2, 3], [4, 0, 0]])
    step = inputs_of(qlens, ctx, tables)
    q = q[:9] if q.shape[0] >= 9 else torch.randn(9, 4, 16, device=DEVICE)

    def run(k, v):
        return paged_attention(q, k, v, step.query_start, step.seq_lens, step.block_tables, step.max_query_len)
    base = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[3, 1], v2[3, 1] = 7.0, -7.0          # position 9 of sequence 0: only its last query sees it
    k2[4], v2[4] = 5.0, 5.0                 # sequence 1's block
    moved = run(k2, v2)
    assert torch.equal(moved[:5], base[:5]), "queries at positions 4..8 saw a key at position 9"
    assert not torch.equal(moved[5], base[5])
    assert not torch.equal(moved[6:], base[6:])


def test_padded_decode_rows_leave_real_rows_alone():
    """A decode batch padded to a graph bucket with scratch rows gives the same rows as unpadded."""
    from meshserve.workers.runtime.paged_attention import paged_attention
    rng = random.Random(3)
    q, (k, v), _, _, _ = random_batch(rng, 8, 2, 32, 16)
    ctx = [17, 40, 5]
    tables = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 0, 0]])
    plan_args = dict(qlens=[1, 1, 1], ctx=ctx, tables=tables)
    plain = inputs_of(**plan_args)
    buffers = StepBuffers(64, 8, 5, DEVICE)
    padded = buffers.fill(StepPlan(*[torch.zeros(3, dtype=torch.int64)] * 3, torch.ones(3, dtype=torch.int64),
                                   torch.tensor(ctx), tables, *[torch.zeros(3, dtype=torch.int64)] * 2,
                                   torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                                   *[torch.zeros(3)] * 6), pad_seqs_to=8)
    assert padded.block_tables.shape == (8, 5) and padded.query_start.tolist() == list(range(9))
    assert padded.seq_lens.tolist()[3:] == [1] * 5 and padded.slot_mapping.tolist() == [0] * 8
    q8 = torch.cat([q[:3], torch.randn(5, 8, 32, device=DEVICE)])
    got = paged_attention(q8, k, v, padded.query_start, padded.seq_lens, padded.block_tables, 1)
    want = paged_attention(q[:3], k, v, plain.query_start, plain.seq_lens, plain.block_tables, 1)
    assert torch.equal(got[:3], want)
    scratch = buffers.fill_scratch(8)  # what a graph is captured with: no context length known
    assert scratch.max_context is None and scratch.seq_lens.tolist() == [1] * 8


def test_ranks_pick_the_attention_asked_for(tmp_path, monkeypatch):
    from meshserve.workers.engine_files import read_engine_meta
    from meshserve.workers.runtime.kernel_ops import TorchOps, TritonOps
    from meshserve.workers.runtime.mesh import Mesh
    from meshserve.workers.runtime.step_runner import StepRunner
    hf = write_llama(tmp_path / "hf", **TINY)
    meshserve("build", "--model", hf, "--dtype", "float32", "--out", tmp_path / "e", "--max-seq-len", 32, "--quiet")
    meta = read_engine_meta(tmp_path / "e")
    mesh = Mesh(0, 1, 1, 1, 0, 0, torch.device("cpu"), None, None)
    for env, want in (("triton", TritonOps), ("reference", TorchOps), ("auto", TorchOps)):
        monkeypatch.setenv("MESHSERVE_KERNELS", env)
        runner = StepRunner(meta, mesh)
        assert all(layer.attention.ops is want and layer.mlp.ops is want for layer in runner.model.layers), env
    monkeypatch.setenv("MESHSERVE_KERNELS", "triton")
    runner = StepRunner(meta, mesh)
    cache = [t.clone() for t in (runner.cache.k, runner.cache.v)]
    runner._warm_up_eager()  # what a GPU rank runs at start-up: scratch prompts, keys in block 0 only
    for before, after in zip(cache, (runner.cache.k, runner.cache.v), strict=True):
        assert torch.equal(before[:, 1:], after[:, 1:]) and not torch.equal(before[:, 0], after[:, 0])
    monkeypatch.setenv("MESHSERVE_KERNELS", "flash")
    with pytest.raises(Exception, match="MESHSERVE_KERNELS='flash' is not allowed"):
        StepRunner(meta, mesh)


@pytest.mark.parametrize("cfg,layouts", [(TINY, [(2, 1)])], ids=["gqa"])  # MHA, head_dim 12: kernel tests
def test_engine_with_triton_kernels_matches_reference(tmp_path, cfg, layouts):
    """Whole engines (prefill, prefix-cache hits, decode) give the same greedy tokens and logits
    with the Triton kernels (attention and fused ops) as with the reference ops."""
    hf = write_llama(tmp_path / "hf", seed=4, **dict(cfg, eos_token_id=None))
    shared = [3, 9, 27, 81, 43, 29, 87, 61, 83, 49, 47, 41, 23, 69, 7, 21, 63, 89, 67, 1]
    prompts = [shared + [5, 6], shared + [11], [2, 4, 8, 16, 32, 64], shared[:7]]
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": p, "max_tokens": 5, "temperature": 0, "return_logits": True} for p in prompts])
    if DEVICE == "cuda":  # one GPU per rank
        layouts = [(tp, pp) for tp, pp in layouts if tp * pp <= torch.cuda.device_count()] or [(1, 1)]
    for tp, pp in layouts:
        engine = tmp_path / f"tp{tp}pp{pp}"
        meshserve("build", "--model", hf, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
                  "--max-seq-len", 64, "--kv-block-size", 4, "--quiet")
        out = {}
        for backend in ("reference", "triton"):
            meshserve("generate", "--engine", engine, "--input", requests, "--output", engine / f"{backend}.jsonl",
                      "--quiet", env={"MESHSERVE_KERNELS": backend, "TRITON_INTERPRET": "1"}, device=DEVICE)
            out[backend] = read_jsonl(engine / f"{backend}.jsonl")
        for ref, got in zip(out["reference"], out["triton"], strict=True):
            assert got["token_ids"] == ref["token_ids"], f"tp={tp} pp={pp}"
            diff = (torch.tensor(got["logits"]) - torch.tensor(ref["logits"])).abs().max().item()
            assert diff < 1e-4, f"tp={tp} pp={pp}: logits differ by {diff}"


@pytest.mark.parametrize("qlens", [[1, 0, 0, 1], [3, 0, 1, 1], [1, 0], [2, 0]], ids=str)
def test_fork_rows_take_no_token_and_sample_their_leaders_last(qlens):
    """A fork row (a sequence forking off the prompt of the row before it) feeds no token: the kernel
    runs one-token rows through the split decode path only when every sequence has one, and the
    fork row scores the token row of the sequence before it."""
    from meshserve.workers.runtime.paged_attention import paged_attention
    heads, kv_heads, head_dim, block_size = SHAPES[0]
    g = torch.Generator().manual_seed(len(qlens) * 10 + sum(qlens))
    num_blocks = 24
    k, v = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE) for _ in "kv"]
    ctx = [q + 20 if q else 0 for q in qlens]
    for i, q in enumerate(qlens):
        if not q:
            ctx[i] = ctx[i - 1]  # it shares the leader's table and keys
    tables = torch.tensor([[1 + 2 * i, 2 + 2 * i] for i in range(len(qlens))])
    for i, q in enumerate(qlens):
        if not q:
            tables[i] = tables[i - 1]
    q = torch.randn(sum(qlens), heads, head_dim, generator=g).to(DEVICE)
    step = inputs_of(qlens, ctx, tables)
    got = paged_attention(q, k, v, step.query_start, step.seq_lens, step.block_tables, step.max_query_len)
    want = reference_attention(q, k, v, step)
    assert got.shape == want.shape == q.shape and (got - want).abs().max().item() < 1e-5
    last = torch.tensor(qlens).cumsum(0) - 1
    assert step.sample_index.tolist() == last.tolist()
    for i, n in enumerate(qlens):
        if not n:
            assert step.sample_index[i] == step.sample_index[i - 1]


def test_kv_block_copies_read_every_source_first():
    """copy_blocks copies whole blocks, every layer, K and V; a block both copied from and copied into
    in one step gives its old contents."""
    from meshserve.workers.runtime.kv_cache import KVCache
    cache = KVCache(3, 6, 4, 2, 8, torch.float32, DEVICE)
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    k, v = cache.k.clone(), cache.v.clone()
    cache.copy_blocks(torch.tensor([[2, 5], [4, 2]]))
    assert torch.equal(cache.k[:, 5], k[:, 2]) and torch.equal(cache.v[:, 5], v[:, 2])
    assert torch.equal(cache.k[:, 2], k[:, 4]) and torch.equal(cache.v[:, 2], v[:, 4])
    for b in (0, 1, 3, 4):
        assert torch.equal(cache.k[:, b], k[:, b]) and torch.equal(cache.v[:, b], v[:, b])


def test_step_inputs_start_aligned_and_hold_the_plan_whatever_the_step_shape():
    """Every region of a step's inputs starts 64-byte aligned for any token / sequence / width /
    prompt-row count (Triton compiles a kernel anew for each pointer alignment it meets), and the
    views hold the plan's values."""
    rng = random.Random(5)
    buffers = StepBuffers(96, 12, 7, "cpu")
    for _ in range(200):
        b = rng.randint(1, 12)
        qlens = [rng.randint(1, 96 // b) for _ in range(b)]
        t, width = sum(qlens), rng.randint(1, 7)
        ctx = [q + rng.randint(0, 20) for q in qlens]
        tables = torch.randint(1, 50, (b, width))
        ids, pos, slots = (torch.randint(0, 1000, (t,)) for _ in range(3))
        plan = StepPlan(ids, pos, slots, torch.tensor(qlens), torch.tensor(ctx), tables,
                        *[torch.zeros(b, dtype=torch.int64)] * 2, torch.zeros(b, 0, dtype=torch.int64),
                        torch.zeros(b, dtype=torch.int64), *[torch.zeros(b)] * 6)
        step = buffers.fill(plan)
        base = buffers.buffer.data_ptr()
        regions = (step.input_ids, step.positions, step.slot_mapping, step.query_start, step.seq_lens,
                   step.block_tables, step.sample_index)
        assert all((r.data_ptr() - base) % 64 == 0 for r in regions), (t, b, width)
        assert step.input_ids.tolist() == ids.tolist() and step.slot_mapping.tolist() == slots.tolist()
        assert step.positions.tolist() == pos.tolist() and step.seq_lens.tolist() == ctx
        assert step.block_tables.tolist() == tables.tolist()
        assert step.query_start.tolist() == [0, *torch.tensor(qlens).cumsum(0).tolist()]
        assert step.sample_index.tolist() == [q - 1 for q in step.query_start.tolist()[1:]]
