"""Make the bundled debsum sample (recipes/offline_tasks/data/debsum/) from the full set.

The offline main job (scripts/compare.py) and the tests train on this sample, so it
must be small enough to ship in the repo and deterministic to rebuild:

    python scripts/make_debsum_sample.py --source ../shared/data/debsum

Each split is a seeded uniform sample of the source split, written as gzipped JSONL
with the source fields (id, document, summary) unchanged, in source order.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

DEFAULT_SIZES = {"train": 16000, "validation": 500, "test": 500}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "recipes" / "offline_tasks" / "data" / "debsum"


def sample_split(source: Path, out: Path, size: int, seed: int) -> int:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if size > len(lines):
        raise ValueError(f"--{out.stem.split('.')[0]}-size: asked for {size} rows, {source} has {len(lines)}")
    keep = sorted(random.Random(seed).sample(range(len(lines)), size))
    # mtime=0 keeps the gzip bytes identical across rebuilds.
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for i in keep:
            f.write(json.dumps(json.loads(lines[i]), ensure_ascii=False).encode("utf-8") + b"\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "debsum")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    for split, size in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}-size", type=int, default=size)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split in DEFAULT_SIZES:
        size = getattr(args, f"{split}_size")
        out = args.output_dir / f"{split}.jsonl.gz"
        total = sample_split(args.source / f"{split}.jsonl.gz", out, size, args.seed)
        print(f"{split}: {size} of {total} rows -> {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
