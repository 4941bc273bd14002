"""Prepare a dataset: `python -m data_prep {pascal,cityscapes,camvid,synthetic} --raw DIR --out DATA_DIR`.

Writes `DATA_DIR/<name>/1.0.0/` (TFDS ArrayRecord, record format v1 of data_prep/common.py) with a
fingerprint of its inputs. Rerunning keeps a dataset with the same fingerprint and refuses one built
from other inputs unless `--rebuild` is given. Use DATA_DIR as `config.data.root`. See docs/data.md
for the expected raw layouts.
"""
import argparse
import os
import sys

from data_prep import camvid, cityscapes, common, pascal, synthetic

BUILDERS = {"pascal": pascal.Pascal, "cityscapes": cityscapes.Cityscapes, "camvid": camvid.Camvid}
MESSAGES = {"built": "prepared {} in {}", "rebuilt": "rebuilt {} in {}",
            "unchanged": "{} already prepared (fingerprint matches) in {}"}


def main(argv=None) -> int:
    """Parses the command line and prepares one dataset; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=[*BUILDERS, "synthetic"])
    parser.add_argument("--raw", help="raw dataset folder (not for synthetic)")
    parser.add_argument("--out", required=True, help="output data dir (config.data.root)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build again and replace the prepared dataset (kept until the new one is complete)")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count(),
                        help="decoding/validation processes (0: in this process)")
    parser.add_argument("--num-train", type=int, default=256, help="synthetic: train images")
    parser.add_argument("--num-val", type=int, default=64, help="synthetic: val images")
    parser.add_argument("--min-size", type=int, default=64, help="synthetic: smallest side")
    parser.add_argument("--max-size", type=int, default=96, help="synthetic: largest side")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    args = parser.parse_args(argv)
    if args.dataset == "synthetic" and args.raw:
        parser.error("synthetic is generated, it takes no --raw")
    if args.dataset != "synthetic" and not args.raw:
        parser.error(f"{args.dataset} needs --raw DIR")
    try:
        if args.dataset == "synthetic":
            builder = synthetic.Synthetic(data_dir=args.out, num_train=args.num_train, num_val=args.num_val,
                                          image_size=(args.min_size, args.max_size), seed=args.seed)
        else:
            builder = BUILDERS[args.dataset](data_dir=args.out, raw_dir=args.raw, num_workers=args.num_workers)
        path, status = common.prepare(builder, rebuild=args.rebuild)
    except (common.DataPrepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(MESSAGES[status].format(args.dataset, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
