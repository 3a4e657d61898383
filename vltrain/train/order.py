"""The order and the randomness of training samples, as functions of (seed, epoch, index) only.

The HF Trainer's default `RandomSampler` draws its permutation from the global torch RNG when an epoch starts, so a
run resumed mid-epoch sees another order than the run it continues. Here the permutation of epoch e is that of
`torch.Generator().manual_seed(seed + e)`, the same on every rank (accelerate then gives each rank its share), and
the Trainer skips the batches a checkpoint already consumed (`ignore_data_skip=False`). Every sample is produced
with the Python, numpy and torch RNGs of its DataLoader worker seeded from (seed, epoch, index), so any random
choice while reading a record is the same whichever worker reads it, and whether or not the run was resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: a permutation of the dataset that depends on (seed, epoch) only. With
    `group_size`, samples of similar `lengths` are grouped (transformers' length-grouped order: mega-batches of 50
    groups sorted by length, the longest group first), drawn from the same generator."""

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, group_size: int | None = None):
        self.size = size
        self.seed = seed
        self.lengths = lengths
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_size and self.lengths is not None:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order = get_length_grouped_indices(self.lengths, self.group_size, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator).tolist()
        for index in order:
            yield self.epoch, index


class SeededSamples(Dataset):
    """A training dataset read through (epoch, index) keys: every sample is made under RNGs seeded from
    (seed, epoch, index). Returns (index, sample), so the collator can say which records formed a batch."""

    def __init__(self, dataset: Dataset, seed: int, where: list[str]):
        self.dataset = dataset
        self.seed = seed
        self.where = where
        """`file:line` of each record, for messages about a batch."""
        self.lengths = getattr(dataset, "lengths", None)
        """Token counts of the samples (length grouping), when the dataset knows them."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = (self.seed * 1_000_003 + epoch * 7_919 + index) % 2**32
        # In the main process (no workers) the training RNGs (dropout) must not see this: keep them as they were.
        saved = None if get_worker_info() else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return index, self.dataset[index]
        finally:
            if saved:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class IndexedCollator:
    """Wraps a collator: (index, sample) items become the batch plus `record_index`, the B record indices as a list
    (it crosses from the DataLoader workers inside the pickle, where every tensor costs a shared-memory hand-over)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        if items and isinstance(items[0], tuple):
            indices, samples = zip(*items)
            batch = self.collator(list(samples))
            batch["record_index"] = list(indices)
            return batch
        return self.collator(items)
