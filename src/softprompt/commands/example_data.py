"""``softprompt example-data NAME --out DIR``: write a real data set as train/dev/test JSONL."""

from __future__ import annotations

import argparse

from ..examples import DATASETS, write_example_data


def register(sub) -> None:
    listing = "; ".join(f"{k}: {v.description}" for k, v in DATASETS.items())
    p = sub.add_parser("example-data", help="write a real example data set as train/dev/test JSONL",
                       description=f"Write a real data set as train/dev/test JSONL (seeded split, 80/10/10, "
                                   f"stratified by label for classification). Data sets: {listing}.")
    p.add_argument("name", choices=list(DATASETS), help="which data set")
    p.add_argument("--out", required=True, help="output folder (train.jsonl, dev.jsonl, test.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample and the split (default: 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="subsample this many examples first (seeded, stratified by label)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ds = DATASETS[args.name]
    written = write_example_data(args.name, args.out, seed=args.seed, limit=args.limit)
    total = sum(n for _, n in written.values())
    print(f"{args.name} ({ds.kind}): {total:,} examples, seed {args.seed}")
    for split, (path, n) in written.items():
        print(f"  {split:<5} {n:>6,}  {path}")
    return 0
