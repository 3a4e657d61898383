"""Write the coloured-shapes demo dataset (see vltrain.data.demo)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vltrain.data.demo import majority_baseline, write_demo_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="dataset root folder")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    split = write_demo_dataset(args.out, args.n_train, args.n_val, args.seed, args.image_size)
    print(f"train: {split.train}")
    print(f"val:   {split.val}")
    print(f"majority baseline on val: {majority_baseline(split.val, split.train):.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
