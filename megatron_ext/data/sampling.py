"""Which record each sample of each step is: epochs, shuffling, DP and micro-batches.

Why: resuming must replay exactly the data order of an uninterrupted run, and
parallel runs must see the same global batches as a single process. So the
order is a pure function of (seed, epoch, number of records): sample ``g`` of
the run is record ``permutation(seed, g // n)[g % n]``, and the only state to
checkpoint is the number of samples consumed.
"""

from __future__ import annotations

import numpy as np

from megatron_ext.errors import ConfigError


class EpochOrder:
    """Deterministic record order across epochs (a new permutation per epoch)."""

    def __init__(self, num_records: int, seed: int, shuffle: bool = True):
        if num_records <= 0:
            raise ConfigError("the dataset has no record")
        self.num_records = num_records
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_records)
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.num_records)
        return self._cache[epoch]

    def records(self, first_sample: int, count: int) -> np.ndarray:
        """Record indices of samples ``first_sample .. first_sample + count - 1``."""
        return self.of(np.arange(first_sample, first_sample + count))

    def of(self, samples: np.ndarray) -> np.ndarray:
        """Record indices of the samples numbered ``samples`` (any order)."""
        samples = np.asarray(samples, dtype=np.int64)
        out = np.empty(len(samples), dtype=np.int64)
        for epoch in np.unique(samples // self.num_records):
            chosen = samples // self.num_records == epoch
            out[chosen] = self.permutation(int(epoch))[samples[chosen] % self.num_records]
        return out


def micro_batch_records(global_records: np.ndarray, dp_rank: int, dp_size: int,
                        micro_batch_size: int) -> list[np.ndarray]:
    """This DP rank's micro-batches of one global batch.

    Micro-step k covers ``global_records[k*mbs*dp : (k+1)*mbs*dp]`` and rank r
    takes its r-th slice, as Megatron's pretraining sampler does.
    """
    per_step = micro_batch_size * dp_size
    if len(global_records) % per_step:
        raise ConfigError(
            f"global batch {len(global_records)} is not divisible by micro batch "
            f"{micro_batch_size} x data parallel {dp_size}"
        )
    return [global_records[start + dp_rank * micro_batch_size:
                           start + (dp_rank + 1) * micro_batch_size]
            for start in range(0, len(global_records), per_step)]
