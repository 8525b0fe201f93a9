import random

from orchestrator.block_manager import BlockManager
from orchestrator.sampling_params import SamplingParams
from orchestrator.scheduler import Scheduler
from orchestrator.sequence import Sequence


def test_blocks_never_leak_over_random_workloads():
    rng = random.Random(0)
    for trial in range(30):
        blocks = BlockManager(num_blocks=40, block_size=4)
        sched = Scheduler(blocks, max_batch_size=rng.randint(1, 6), max_num_tokens=rng.randint(6, 40),
                          max_seq_len=64)
        seqs = [Sequence(i, [1] * rng.randint(1, 30), SamplingParams(max_tokens=rng.randint(1, 30)))
                for i in range(rng.randint(1, 25))]
        for s in seqs:
            sched.add(s)
        steps = 0
        while sched.has_work():
            batch = sched.schedule()
            assert batch.seqs, "no progress"
            assert sum(batch.num_new) <= sched.max_num_tokens and len(sched.running) <= sched.max_batch_size
            held = sum(len(s.block_table) for s in sched.running)
            assert held == blocks.num_used
            for seq, n in zip(batch.seqs, batch.num_new):
                seq.num_computed += n
                if seq.num_computed == seq.num_tokens:
                    seq.output_ids.append(5)
                    if len(seq.output_ids) >= seq.params.max_tokens:
                        sched.finish(seq, "length")
            steps += 1
        assert blocks.num_used == 0 and all(s.finished for s in seqs)
        assert [s.request_id for s in sorted(seqs, key=lambda s: s.request_id)] == list(range(len(seqs)))
