"""Block allocator and scheduler on integers with a fake model: chunking, preemption, abort, EOS,
prefix sharing; every block back in the free list at the end of each test."""

import itertools

import pytest

from server.engine.kv_cache import BlockAllocator
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import FinishReason, SamplingParams, Sequence

EOS = 99999


def fake_token(seq: Sequence) -> int:
    """Deterministic 'model': next token depends on the whole sequence so far."""
    return (sum(seq.all_ids) * 31 + seq.num_tokens) % 1000


def run(sched: Scheduler, steps: int = 10_000, on_step=None) -> list:
    log = []
    for step in range(steps):
        batch = sched.schedule()
        if batch.is_empty:
            break
        assert batch.num_tokens <= sched.config.max_num_batched_tokens
        log.append([(it.seq.request_id, it.num_new_tokens) for it in batch.seqs])
        sampled = {id(it.seq): fake_token(it.seq) for it in batch.seqs if it.samples}
        sched.update(batch, sampled, frozenset({EOS}))
        if on_step:
            on_step(step, sched)
    return log


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=True, max_len=512):
    alloc = BlockAllocator(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_len), alloc)


def seq(rid, n, max_tokens=5, start=1, **kw):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, **kw))


def assert_all_free(sched):
    assert sched.allocator.num_free == sched.allocator.num_blocks
    assert all(b.ref_count == 0 for b in sched.allocator.blocks)


def test_long_prompt_is_chunked_and_decodes_keep_running():
    s = make(budget=8)
    short = seq("short", 3, max_tokens=20)
    s.add(short)
    run(s, steps=2)  # short is decoding now
    long = seq("long", 30, max_tokens=3, start=100)
    s.add(long)
    log = run(s)
    long_chunks = [n for step in log for rid, n in step if rid == "long"]
    assert long_chunks[:4] == [7, 7, 7, 7]  # 1 token of each step's budget goes to the decode
    # the decoding sequence got a token in every step while the long prompt was prefilling
    assert all(any(rid == "short" for rid, _ in step) for step in log[:4])
    assert long.num_output_tokens == 3 and long.finish_reason == FinishReason.LENGTH
    assert_all_free(s)


def test_preemption_recomputes_and_finishes_everything():
    s = make(num_blocks=12, block_size=4, budget=64, max_seqs=8)
    seqs = [seq(f"r{i}", 10, max_tokens=12, start=10 * i) for i in range(4)]
    for q in seqs:
        s.add(q)
    run(s)
    assert s.num_preemptions > 0
    assert all(q.is_finished and q.num_output_tokens == 12 for q in seqs)
    # the preempted ones produced the same tokens the fake model gives without preemption
    for q in seqs:
        solo = make(num_blocks=64)
        r = seq(q.request_id, 10, max_tokens=12, start=q.prompt_ids[0])
        solo.add(r)
        run(solo)
        assert r.output_ids == q.output_ids
    assert_all_free(s)


def test_abort_frees_blocks_at_once():
    s = make()
    a, b = seq("a", 9, max_tokens=50), seq("b", 9, max_tokens=50, start=50)
    s.add(a)
    s.add(b)
    run(s, steps=3)
    assert a.block_table and b.block_table
    s.abort(a)
    assert a.finish_reason == FinishReason.ABORT and not a.block_table
    waiting = seq("w", 5)
    s.add(waiting)
    s.abort(waiting)
    assert waiting.is_finished and waiting not in s.waiting
    run(s)
    assert b.num_output_tokens == 50
    assert_all_free(s)


def test_eos_and_stop_token_ids_finish_with_stop():
    s = make()
    q = seq("e", 4, max_tokens=100)
    s.add(q)
    batch = s.schedule()
    s.update(batch, {id(q): EOS}, frozenset({EOS}))
    assert q.finish_reason == FinishReason.STOP and q.output_ids == [EOS]
    q2 = seq("i", 4, max_tokens=3, ignore_eos=True)
    s.add(q2)
    for _ in range(3):
        batch = s.schedule()
        s.update(batch, {id(q2): EOS}, frozenset({EOS}))
    assert q2.finish_reason == FinishReason.LENGTH and q2.output_ids == [EOS] * 3
    q3 = seq("t", 4, max_tokens=10, stop_token_ids=(7,))
    s.add(q3)
    batch = s.schedule()
    s.update(batch, {id(q3): 7}, frozenset({EOS}))
    assert q3.finish_reason == FinishReason.STOP
    assert_all_free(s)


def test_prefix_blocks_are_shared_and_counted():
    s = make(block_size=4)
    system = list(range(500, 512))  # 3 full blocks
    a = Sequence("a", system + [1, 2], SamplingParams(max_tokens=2))
    s.add(a)
    run(s)
    b = Sequence("b", system + [3, 4, 5], SamplingParams(max_tokens=2))
    s.add(b)
    batch = s.schedule()
    assert b.num_cached_prompt_tokens == 12  # the three system-prompt blocks came from the cache
    assert batch.seqs[0].num_new_tokens == 3
    assert s.allocator.prefix_hits == 3
    run(s)
    assert_all_free(s)


def test_shared_blocks_survive_one_owner_aborting():
    s = make(block_size=4)
    shared = list(range(300, 308))
    a = Sequence("a", shared + [1], SamplingParams(max_tokens=30))
    s.add(a)
    run(s, steps=2)
    b = Sequence("b", shared + [2], SamplingParams(max_tokens=30))
    s.add(b)
    run(s, steps=1)
    assert a.block_table[:2] == b.block_table[:2]
    s.abort(a)
    assert all(s.allocator.blocks[i].ref_count == 1 for i in b.block_table[:2])
    run(s)
    assert b.num_output_tokens == 30
    assert_all_free(s)


def test_too_long_for_the_cache_is_refused():
    s = make(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        s.add(seq("big", 17))


def test_many_random_requests_leave_no_block_behind():
    s = make(num_blocks=40, block_size=4, budget=16, max_seqs=6)
    ids = itertools.count()
    seqs = []

    def add_more(step, sched):
        if step % 3 == 0 and len(seqs) < 30:
            q = seq(f"r{next(ids)}", 3 + step % 11, max_tokens=2 + step % 7, start=step % 5)
            sched.add(q)
            seqs.append(q)
        if step % 7 == 0 and seqs and not seqs[-1].is_finished:
            sched.abort(seqs[-1])

    add_more(0, s)
    run(s, on_step=add_more)
    assert all(q.is_finished for q in seqs)
    assert_all_free(s)
