"""The torch Datasets that hand samples to the Trainer, and packing.

Samples reach the Trainer one of two ways (`data.encode`), giving identical tensors:
  - `datasets` (default): `PreEncodedDataset` serves the rows of the encode cache (vltrain.data.encode_cache);
  - `lazy`: `EncodedDataset` encodes record i when the DataLoader asks for it (in its workers), every epoch.
Tiles are served as their uint8 pixels and normalised by the trainer on its device (`vltrain.speed.FastSteps`) by
the function the encoder uses, so the floats are the same bits. `PackedDataset` groups samples into packs of up to
`data.max_length` tokens (`data.packing`), from the token counts the check measured (`lengths`, also what
`group_by_length` sorts by).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from vltrain.data.encode import Encoder, Sample
from vltrain.data.encode_cache import row_to_sample
from vltrain.data.records import Record
from vltrain.speed import ready_data_process

# ---- lazy encoding --------------------------------------------------------------------------------------------


class EncodedDataset(Dataset):
    """Encodes record i on access (in DataLoader workers), so images are decoded only when needed. Tiles come out
    as uint8 pixels (4x fewer bytes between processes); the trainer normalises them. `lengths`: tokens per record,
    from the data check (for length grouping and packing)."""

    def __init__(self, records: list[Record], encoder: Encoder, lengths: list[int] | None = None):
        self.records = records
        self.encoder = encoder
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        ready_data_process()
        return self.encoder(self.records[index], normalise=False)


# ---- packing --------------------------------------------------------------------------------------------------


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of records grouped into packs of at most `max_length` tokens (best fit, longest first: a few
    percent of padding at most on realistic mixes). No record is split; each pack lists its records in dataset
    order; packs come in the order of their first record. Deterministic."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, pack number), sorted: the tightest pack that fits is found by
    for i in order:                   # bisection
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"a record of {n} tokens does not fit data.max_length={max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, p = free.pop(k)
            packs[p].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, p))
        else:
            packs.append([i])
            if max_length - n > 0:
                bisect.insort(free, (max_length - n, len(packs) - 1))
    groups = [sorted(p) for p in packs]
    return sorted(groups, key=lambda g: g[0])


class PackedDataset(Dataset):
    """Packs of samples (`pack_groups`): item i is the list of samples of pack i, in order; `Collator(packing=True)`
    puts them in one row. `lengths` are the packs' token counts (for length grouping)."""

    def __init__(self, dataset: Dataset, lengths: list[int], max_length: int):
        self.dataset = dataset
        self.groups = pack_groups(lengths, max_length)
        self.lengths = [sum(lengths[i] for i in g) for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[Sample]:
        return [self.dataset[i] for i in self.groups[index]]


# ---- the encode cache ------------------------------------------------------------------------------------------


class PreEncodedDataset(Dataset):
    """Samples read back from `encode_with_datasets`' cache, tiles as uint8 (the trainer normalises them); `rows`
    selects (and orders) the rows served. `lengths`: tokens per served row."""

    def __init__(self, encoded, rows: list[int] | None = None, lengths: list[int] | None = None):
        self.encoded = encoded.with_format("arrow")
        self.rows = list(range(len(encoded))) if rows is None else rows
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        ready_data_process()
        return row_to_sample(self.encoded[self.rows[index]], normalise=False)
