"""The training data stream: each rank's micro-batches from any data position, for any number of processes.

Epoch e's order is one permutation of the training set seeded by (seed, e), the same whatever the number of
processes (it is `DistributedSampler`'s). A micro-step of all ranks together takes the next
world_size x batch_size pairs of it, rank r every world_size-th pair starting at r. The position is therefore
(epoch, pairs of that epoch consumed by all ranks together), and a run resumed on another number of
processes continues with exactly the pairs that come next.
"""
import torch
from torch.utils.data import DataLoader

DataPosition = tuple[int, int]  # (epoch, pairs of that epoch already consumed)


class MicroBatches:
    def __init__(self, dataset, collator, rank: int, world_size: int, batch_size: int, seed: int, micro_per_epoch: int):
        self.dataset, self.collator = dataset, collator
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.pairs_per_step = world_size * batch_size  # pairs one micro-step of all ranks takes
        self.pairs_per_epoch = micro_per_epoch * self.pairs_per_step

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator)[: self.pairs_per_epoch].tolist()

    def _micro_left(self, offset: int) -> int:
        """Whole micro-steps left in an epoch from pair `offset` (a remainder too small for one is skipped)."""
        return max(self.pairs_per_epoch - offset, 0) // self.pairs_per_step

    def advance(self, position: DataPosition, micro_batches: int) -> DataPosition:
        """The position after `micro_batches` more micro-batches per rank."""
        epoch, offset = position
        while micro_batches >= (left := self._micro_left(offset)):
            micro_batches -= left
            epoch, offset = epoch + 1, 0
        return epoch, offset + micro_batches * self.pairs_per_step

    def iterate(self, position: DataPosition):
        """This rank's micro-batches from `position` on, endlessly."""
        epoch, offset = position
        while True:
            end = offset + self._micro_left(offset) * self.pairs_per_step
            indices = self._order(epoch)[offset + self.rank : end : self.world_size]
            # A generator of its own: starting a DataLoader draws a seed from it, and a draw from the global RNG
            # here would shift the dropout stream of a resumed run against the uninterrupted one.
            yield from DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=indices, collate_fn=self.collator,
                generator=torch.Generator(),
            )
            epoch, offset = epoch + 1, 0
