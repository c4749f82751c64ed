"""The scheduler's lanes: a lane's work goes to its device; a device with nothing of its own takes any."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from vggt_cache.service.engine.scheduler import Scheduler
from vggt_cache.service.engine.work import Flight, Priority
from vggt_cache.service.jobs.runner import lane_chunks
from vggt_cache.service.units import Unit

from helpers.service import poll

LONG_WAIT_S = 60.0  # a group is due when full or when nothing more of its lane is decoding


def job(name: str, lane: int | None, frames: int = 3) -> Flight:
    return Flight(
        Unit.causal([f"/data/{name}_{i}.png" for i in range(frames)]),
        Priority.BULK,
        Future(),
        skip_existing=False,
        verify=False,
        return_features=False,
        lane=lane,
    )


def admit_and_decode(scheduler: Scheduler, jobs: list[Flight], keep_decoding: set[Flight] = frozenset()) -> None:
    """Admit `jobs` and hand each decoded one to the devices, except those left decoding."""
    assert scheduler.admit(jobs, Priority.BULK) == []
    for _ in jobs:
        decoding = scheduler.next_to_decode()
        if decoding not in keep_decoding:
            decoding.images = torch.zeros(decoding.n_frames, 3, 14, 14)
            assert scheduler.decoded(decoding, runnable=True)


def test_a_lanes_work_goes_to_its_own_device_before_older_work_of_another_lane():
    scheduler = Scheduler(max_batch_frames=6, max_wait_s=LONG_WAIT_S, bulk_limit=100)
    a0, b0, a1, b1 = job("a0", 0), job("b0", 1), job("a1", 0), job("b1", 1)
    admit_and_decode(scheduler, [a0, b0, a1, b1])
    assert scheduler.next_batch(lane=1) == [b0, b1]
    assert scheduler.next_batch(lane=0) == [a0, a1]


def test_a_device_whose_lane_is_empty_takes_another_lanes_work():
    scheduler = Scheduler(max_batch_frames=3, max_wait_s=LONG_WAIT_S, bulk_limit=100)
    a0, a1 = job("a0", 0), job("a1", 0)
    admit_and_decode(scheduler, [a0, a1])
    assert scheduler.next_batch(lane=1) == [a0]
    assert scheduler.next_batch(lane=0) == [a1]


def test_a_device_waits_for_its_own_lane_while_its_work_is_still_decoding():
    scheduler = Scheduler(max_batch_frames=3, max_wait_s=LONG_WAIT_S, bulk_limit=100)
    a0, b0 = job("a0", 0), job("b0", 1)
    admit_and_decode(scheduler, [a0, b0], keep_decoding={b0})
    taken: list[list[Flight] | None] = []
    device_1 = threading.Thread(target=lambda: taken.append(scheduler.next_batch(lane=1)))
    device_1.start()
    poll(lambda: scheduler.idle_devices() == 1, 30, "device 1 waiting for its lane")
    assert taken == []  # a0 was due all along, but lane 1 still had b0 coming
    b0.images = torch.zeros(3, 3, 14, 14)
    scheduler.decoded(b0, runnable=True)
    device_1.join(timeout=30)
    assert taken == [[b0]]
    assert scheduler.next_batch(lane=0) == [a0]


def test_work_without_a_lane_goes_to_any_device_and_on_demand_first():
    scheduler = Scheduler(max_batch_frames=3, max_wait_s=LONG_WAIT_S, bulk_limit=100)
    bulk, coming = job("a0", 0), job("b0", 1)
    admit_and_decode(scheduler, [bulk, coming], keep_decoding={coming})  # lane 1 is not empty
    urgent = Flight(Unit.frame("/data/q.png"), Priority.ON_DEMAND, Future(), False, False, True)
    assert scheduler.admit([urgent], Priority.ON_DEMAND) == []
    decoding = scheduler.next_to_decode()
    decoding.images = torch.zeros(1, 3, 14, 14)
    scheduler.decoded(decoding, runnable=True)
    assert scheduler.next_batch(lane=1) == [urgent]
    assert scheduler.next_batch(lane=0) == [bulk]


def test_lane_chunks_cut_the_plan_into_contiguous_stretches_taken_a_unit_of_each_in_turn():
    plan = list(range(10))
    chunks = list(lane_chunks(plan, lanes=3, chunk_units=4))  # stretches 0-2, 3-5, 6-9
    assert chunks == [([0, 3, 6, 1], [0, 1, 2, 0]), ([4, 7, 2, 5], [1, 2, 0, 1]), ([8, 9], [2, 2])]
    assert sorted(u for units, _ in chunks for u in units) == plan
    assert list(lane_chunks(plan, lanes=1, chunk_units=4)) == [
        ([0, 1, 2, 3], None),
        ([4, 5, 6, 7], None),
        ([8, 9], None),
    ]
    assert list(lane_chunks([None], lanes=4, chunk_units=8)) == [([None], [3])]
