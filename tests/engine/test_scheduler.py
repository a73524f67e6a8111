"""The scheduler without a model: admission by capacity, chunk budgets, preemption order, and aborts
at every state. A step is simulated by `run_step`, the one place that stands in for the runner."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import BlockManager
from server.engine.outputs import Timings
from server.engine.params import SamplingParams
from server.engine.scheduler import ScheduledStep, Scheduler
from server.engine.sequence import Request, Sequence, Status

BS = 4
SAMPLED = 7
"""The token every simulated step "samples"."""


def make_seq(num_tokens: int, first: int = 1) -> Sequence:
    token_ids = list(range(first, first + num_tokens))
    request = Request("r", list(token_ids), SamplingParams(), 16, None, Timings(0.0))
    return Sequence(request, 0, token_ids, IncrementalDetokenizer([], ()))


def make_scheduler(
    num_blocks: int = 64, max_num_seqs: int = 8, chunk: int = 16, aligned: bool = False
) -> Scheduler:
    blocks = BlockManager(num_blocks, BS, enable_prefix_caching=True)
    return Scheduler(blocks, max_num_seqs, chunk, aligned_chunks=aligned)


def run_step(scheduler: Scheduler, step: ScheduledStep) -> None:
    """What the runner and the engine do with a step, minus the model: the published blocks, and a
    sampled token for each sequence that caught up (the scheduler already advanced the progress)."""
    for seq in step.sequences:
        scheduler.blocks.register_computed(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(SAMPLED)


def scheduled(step: ScheduledStep) -> dict[Sequence, int]:
    return {seq: n for seq, n in zip(step.sequences, step.num_tokens, strict=True)}


def schedule_and_run(scheduler: Scheduler) -> ScheduledStep:
    step = scheduler.schedule()
    run_step(scheduler, step)
    return step


# ---- admission ------------------------------------------------------------------------------------


def test_admission_stops_at_max_num_seqs() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(3) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    step = schedule_and_run(scheduler)
    assert step.sequences == seqs[:2]
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    assert list(scheduler.waiting) == [seqs[2]] and seqs[2].block_table == []
    scheduler.remove(seqs[0])
    assert seqs[2] in schedule_and_run(scheduler).sequences


def test_a_request_that_does_not_fit_the_cache_waits_without_holding_blocks() -> None:
    scheduler = make_scheduler(num_blocks=4)
    big, other = make_seq(10), make_seq(8, first=100)
    scheduler.add(big)
    scheduler.add(other)
    step = schedule_and_run(scheduler)
    # big takes 3 of 4 blocks; other needs 2, plus one kept in reserve for each running sequence.
    assert step.sequences == [big]
    assert other.status is Status.WAITING and other.block_table == []
    assert scheduler.blocks.num_free_blocks == 1
    scheduler.remove(big)
    assert schedule_and_run(scheduler).sequences == [other]


def test_alone_a_request_is_admitted_even_without_the_reserve() -> None:
    scheduler = make_scheduler(num_blocks=3)
    seq = make_seq(12)  # all three blocks
    scheduler.add(seq)
    assert scheduler.schedule().sequences == [seq]
    assert scheduler.blocks.num_free_blocks == 0


def test_prefix_hits_are_counted_once_admitted() -> None:
    scheduler = make_scheduler()
    first = make_seq(9)
    scheduler.add(first)
    schedule_and_run(scheduler)
    again = make_seq(9)
    scheduler.add(again)
    step = scheduler.schedule()
    assert scheduled(step)[again] == 1  # 8 tokens came from the cache
    assert scheduler.prefix_hit_tokens == 8


# ---- chunk budgets --------------------------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget() -> None:
    scheduler = make_scheduler(chunk=8)
    seq = make_seq(20)
    scheduler.add(seq)
    chunks = [scheduled(schedule_and_run(scheduler))[seq] for _ in range(4)]
    assert chunks == [8, 8, 4, 1]  # three prefill chunks, then a decode
    assert seq.num_output_tokens == 2


def test_decodes_run_every_step_and_cost_no_budget() -> None:
    scheduler = make_scheduler(chunk=8)
    decoding = make_seq(3)
    scheduler.add(decoding)
    schedule_and_run(scheduler)  # prefilled: decoding from now on
    long = make_seq(20, first=100)
    scheduler.add(long)
    for expected in (8, 8, 4):
        step = scheduled(schedule_and_run(scheduler))
        assert step == {decoding: 1, long: expected}


def test_prompts_admitted_in_one_step_share_its_budget() -> None:
    scheduler = make_scheduler(chunk=8)
    a, b, c = make_seq(5), make_seq(6, first=100), make_seq(6, first=200)
    for seq in (a, b, c):
        scheduler.add(seq)
    step = scheduled(schedule_and_run(scheduler))
    assert step == {a: 5, b: 3}  # the budget is spent: c waits for the next step
    assert c.status is Status.WAITING
    assert scheduled(scheduler.schedule()) == {a: 1, b: 3, c: 5}


def test_aligned_chunks_end_at_fixed_boundaries_whatever_shares_the_step() -> None:
    """Deterministic mode: a prompt is cut at multiples of the chunk size, so its numerics never
    depend on what else runs, even when that overspends a step's budget."""
    scheduler = make_scheduler(chunk=8, aligned=True)
    a, b = make_seq(12), make_seq(12, first=100)
    scheduler.add(a)
    scheduler.add(b)
    chunks: dict[Sequence, list[int]] = {a: [], b: []}
    while a.num_output_tokens == 0 or b.num_output_tokens == 0:
        for seq, n in scheduled(schedule_and_run(scheduler)).items():
            if n > 1:
                chunks[seq].append(n)
    assert chunks == {a: [8, 4], b: [8, 4]}


# ---- preemption -----------------------------------------------------------------------------------


def test_the_most_recently_admitted_sequence_is_preempted_first() -> None:
    scheduler = make_scheduler(num_blocks=3)
    first, second = make_seq(3), make_seq(3, first=100)
    scheduler.add(first)
    scheduler.add(second)
    schedule_and_run(scheduler)  # both prefilled into one block each; one block free
    schedule_and_run(scheduler)  # both decode: 5 tokens each, 4 computed
    first.token_ids.extend([SAMPLED] * 4)  # first outgrows its blocks: it needs two more
    output = list(second.token_ids)
    step = scheduler.schedule()
    assert step.preempted == [second] and step.sequences == [first]
    assert second.status is Status.WAITING and scheduler.waiting[0] is second
    assert (second.block_table, second.num_computed_tokens) == ([], 0)
    assert second.token_ids == output  # its output is kept: it resumes by recomputing
    assert first.block_table and 0 not in first.block_table


def test_a_sequence_that_cannot_grow_alone_preempts_itself() -> None:
    scheduler = make_scheduler(num_blocks=3)
    first, second = make_seq(4), make_seq(3, first=100)
    scheduler.add(first)
    scheduler.add(second)
    schedule_and_run(scheduler)
    second.token_ids.extend([SAMPLED] * 5)  # now needs 3 blocks; only first's and one free exist
    step = scheduler.schedule()
    assert step.preempted == [second] and second not in step.sequences
    assert scheduled(step) == {first: 1}


def test_a_preempted_sequence_resumes_where_its_output_left_off() -> None:
    scheduler = make_scheduler(num_blocks=3)
    first, second = make_seq(3), make_seq(3, first=100)
    scheduler.add(first)
    scheduler.add(second)
    schedule_and_run(scheduler)
    first.token_ids.extend([SAMPLED] * 5)  # 9 tokens: all three blocks
    assert scheduler.schedule().preempted == [second]
    scheduler.remove(first)
    step = schedule_and_run(scheduler)
    assert scheduled(step) == {second: 4}  # prompt and output recomputed in one chunk
    assert second.num_output_tokens == 2


# ---- aborts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding", "preempted", "in no queue"])
def test_abort_in_every_state_frees_everything(state: str) -> None:
    scheduler = make_scheduler(num_blocks=4, chunk=8)
    other, seq = make_seq(3, first=100), make_seq(6)
    scheduler.add(other)
    if state != "in no queue":  # else a held-back n > 1 choice: never added to a queue
        scheduler.add(seq)
    if state in ("prefilling", "decoding", "preempted"):
        schedule_and_run(scheduler)  # other's 3 prompt tokens and 5 of seq's 6: the budget is spent
        assert seq.status is Status.RUNNING and seq.num_computed_tokens == 5
    if state == "decoding":
        schedule_and_run(scheduler)
        assert seq.num_output_tokens == 1
    if state == "preempted":
        other.token_ids.extend([SAMPLED] * 8)  # other, admitted first, needs 2 more blocks: seq makes room
        assert scheduler.schedule().preempted == [seq]
        assert seq.status is Status.WAITING and seq.block_table == []
    scheduler.remove(seq)
    assert seq.status is Status.FINISHED and seq.block_table == []
    assert seq not in scheduler.running and seq not in scheduler.waiting
    assert seq not in schedule_and_run(scheduler).sequences
    scheduler.remove(other)
    assert scheduler.blocks.num_free_blocks == 4 and not scheduler.has_work
