"""Datasets: which records train and which evaluate, and the torch Dataset that encodes them lazily.

`dataset.train` / `dataset.val` list file specs `path[#N]` (#N samples N rows, repeating when N exceeds the
file, seeded). Without `dataset.val`, `dataset.val_ratio` of the training rows is held out, reproducibly from
`dataset.seed`, so a later evaluation can rebuild exactly the rows the run never trained on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from torch.utils.data import Dataset

from vltrain.config import DatasetConfig
from vltrain.data.encode import Encoder, Sample
from vltrain.data.records import Record, read_records

_SPEC = re.compile(r"^(?P<path>.+?)(?:#(?P<n>\d+))?$")


def read_spec(spec: str, seed: int) -> list[Record]:
    """Rows of one `path[#N]` spec."""
    match = _SPEC.match(spec)
    records = read_records(match["path"])
    if match["n"] is None:
        return records
    n = int(match["n"])
    rng = random.Random(f"{seed}:{spec}")
    repeats, rest = divmod(n, len(records))
    return records * repeats + rng.sample(records, rest)


def load_splits(cfg: DatasetConfig) -> tuple[list[Record], list[Record]]:
    """(train, val) records. A demo dataset is generated first when `demo_root` is set."""
    if cfg.demo_root:
        from vltrain.data.demo import write_demo_dataset

        write_demo_dataset(Path(cfg.demo_root))
    train = [r for spec in cfg.train for r in read_spec(spec, cfg.seed)]
    if cfg.val:
        return train, [r for spec in cfg.val for r in read_spec(spec, cfg.seed)]
    if cfg.val_ratio == 0:
        return train, []
    n_val = max(1, int(len(train) * cfg.val_ratio))
    if n_val >= len(train):
        raise ValueError(f"dataset.val_ratio={cfg.val_ratio} leaves no training rows out of {len(train)}")
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    held_out = set(order[:n_val])
    return ([r for i, r in enumerate(train) if i not in held_out],
            [r for i, r in enumerate(train) if i in held_out])


class EncodedDataset(Dataset):
    """Encodes record i on access (in DataLoader workers), so images are decoded only when needed."""

    def __init__(self, records: list[Record], encoder: Encoder):
        self.records = records
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.encoder(self.records[index])
