"""The default data order: a seeded permutation per epoch, sharded disjointly across ranks.

We shard ourselves instead of letting `accelerator.prepare(dataloader)` re-wrap the sampler: Accelerate shards *batches*
of the user's sampler and synchronises its RNG only for `RandomSampler` (accelerate's `prepare_data_loader`), and
`even_batches` silently repeats items — unwanted in a memorization study. Here every rank computes the same permutation
from (seed, epoch) and takes the slice `perm[rank::world]`; the tail that does not fill a global batch is dropped, so no
item is seen twice in an epoch. Resume = `start_at(k)` (skip the first k items of the shard).
"""

from __future__ import annotations

import numpy as np


class EpochShardSampler:
    def __init__(self, n: int, seed: int, rank: int, world: int, batch_size: int, shuffle: bool = True):
        if n < world * batch_size:
            raise ValueError(
                f"dataset has {n} items, fewer than one global batch ({world} processes × batch {batch_size}); "
                f"lower train.batch_size"
            )
        self.n, self.seed, self.rank, self.world, self.bs, self.shuffle = n, seed, rank, world, batch_size, shuffle
        self.epoch, self.start = 0, 0

    def order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def start_at(self, k: int) -> None:
        self.start = k

    def __len__(self) -> int:
        per_rank = self.n // (self.world * self.bs) * self.bs
        return per_rank - self.start

    def __iter__(self):
        usable = self.n // (self.world * self.bs) * (self.world * self.bs)
        mine = self.order()[:usable][self.rank :: self.world]
        return iter(int(i) for i in mine[self.start :])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}
