"""Multi-process tests that fail instead of hanging: every spawned rank arms a watchdog that prints all of its
threads' stacks and exits once the rank runs past its deadline, so a deadlock fails the test and shows where
each rank waited."""
import faulthandler

import torch.multiprocessing as mp

RANK_DEADLINE_S = 600


def _guarded(rank, worker, deadline_s, *args):
    faulthandler.dump_traceback_later(deadline_s, exit=True)
    try:
        worker(rank, *args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def spawn(worker, args: tuple, nprocs: int, deadline_s: float = RANK_DEADLINE_S):
    """`torch.multiprocessing.spawn(worker, args, nprocs)`, each rank under the watchdog."""
    mp.spawn(_guarded, args=(worker, deadline_s, *args), nprocs=nprocs, join=True)
