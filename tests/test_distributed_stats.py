"""Two gloo ranks with stats_scope="global" behave as one batch holding the union of their pairs.

The margin uses the statistics of every rank's pairs, and it is detached; so each rank's loss and
gradient must equal the union's per-pair losses and gradients restricted to that rank's pairs, rescaled
from the union's mean to the rank's own mean. Ranks hold different numbers of pairs on purpose.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amapo_fast import linear_preference_loss
from spawn_guard import spawn
from test_loss import make_batch

PAIRS_PER_RANK = (3, 2)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pair_rows(pairs, rank_pairs):
    """Row indices of the union batch (chosen rows, then rejected rows) that belong to one rank."""
    offset = sum(PAIRS_PER_RANK[:rank_pairs])
    own = list(range(offset, offset + PAIRS_PER_RANK[rank_pairs]))
    return own + [pairs + i for i in own]


def _rank_main(rank, port, hidden, weight, labels, impl, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = _pair_rows(hidden.shape[0] // 2, rank)
        h = hidden[rows].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, metrics = linear_preference_loss(h, w, labels[rows], beta=2.0, impl=impl, stats_scope="global")
        loss.backward()
        local_loss, _ = linear_preference_loss(hidden[rows], weight, labels[rows], beta=2.0, stats_scope="local")
        results[rank] = dict(
            loss=loss.detach(), metrics=metrics, d_hidden=h.grad, d_weight=w.grad, local_loss=local_loss
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_global_statistics_equal_union_of_ranks(impl):
    pairs = sum(PAIRS_PER_RANK)
    hidden, weight, labels, _ = make_batch(pairs=pairs, dim=12, vocab=40)
    results = mp.Manager().dict()
    spawn(_rank_main, args=(_free_port(), hidden, weight, labels, impl, results), nprocs=2)

    union_h = hidden.clone().requires_grad_(True)
    union_w = weight.clone().requires_grad_(True)
    union_loss, union_metrics = linear_preference_loss(union_h, union_w, labels, beta=2.0, impl=impl, stats_scope="local")
    union_loss.backward()

    # Loss: the union's mean over all pairs is the pair-weighted mean of the ranks' losses.
    weighted = sum(results[r]["loss"] * PAIRS_PER_RANK[r] for r in range(2)) / pairs
    torch.testing.assert_close(weighted, union_loss.detach())
    # Every rank sees the union's batch mean, not its own.
    for rank in range(2):
        torch.testing.assert_close(
            results[rank]["metrics"]["rewards/batch_margin_mean"], union_metrics["rewards/batch_margin_mean"]
        )
    assert not torch.allclose(results[0]["local_loss"] * 3 + results[1]["local_loss"] * 2, union_loss.detach() * 5)
    # Gradients: each rank's rows get the union's gradient, rescaled from 1/pairs to 1/rank_pairs.
    total_d_weight = torch.zeros_like(weight)
    for rank in range(2):
        rows = _pair_rows(pairs, rank)
        scale = pairs / PAIRS_PER_RANK[rank]
        torch.testing.assert_close(results[rank]["d_hidden"], union_h.grad[rows] * scale)
        total_d_weight += results[rank]["d_weight"] * PAIRS_PER_RANK[rank] / pairs
    torch.testing.assert_close(total_d_weight, union_w.grad)
