"""The multi-process tests' watchdog: a rank that never returns fails its test, with its stack, by its deadline."""
import time

import pytest
from torch.multiprocessing import ProcessExitedException

from spawn_guard import spawn


def _rank_that_waits_forever(rank):
    if rank == 1:
        while True:
            time.sleep(0.05)


def test_a_hung_rank_fails_with_its_stack(capfd):
    started = time.monotonic()
    with pytest.raises(ProcessExitedException):
        spawn(_rank_that_waits_forever, args=(), nprocs=2, deadline_s=3)
    assert time.monotonic() - started < 60
    assert "_rank_that_waits_forever" in capfd.readouterr().err  # where the rank waited
