"""Prepare a dataset: `python -m data_prep {pascal,cityscapes,camvid,coco,ade20k,synthetic} --raw DIR --out DATA_DIR`.

Writes `DATA_DIR/<name>/1.0.0/` (TFDS ArrayRecord, record format v1 of data_prep/common.py) with a
fingerprint of its inputs. Rerunning keeps a dataset with the same fingerprint and refuses one built
from other inputs unless `--rebuild` is given. Use DATA_DIR as `config.data.root`. See docs/data.md
for the expected raw layouts. `coco --from-instances --compare-to MASKS_DIR` writes no dataset but a
report `DATA_DIR/coco_compare.json` comparing the generated masks with MASKS_DIR's.
"""
import argparse
import os
import pathlib
import sys

from data_prep import ade20k, camvid, cityscapes, coco, common, pascal, synthetic

BUILDERS = {"pascal": pascal.Pascal, "cityscapes": cityscapes.Cityscapes, "camvid": camvid.Camvid,
            "coco": coco.Coco, "ade20k": ade20k.Ade20k}
# dataset-specific flags: {dest: (the dataset it applies to, the flag it needs besides)}
OPTIONS = {"from_instances": ("coco", None), "overlap": ("coco", "from_instances"),
           "crowd": ("coco", "from_instances"), "compare_to": ("coco", "from_instances"), "labels": ("ade20k", None)}
MESSAGES = {"built": "prepared {} in {}", "rebuilt": "rebuilt {} in {}",
            "unchanged": "{} already prepared (fingerprint matches) in {}"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


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
    parser.add_argument("--from-instances", action="store_true", default=None,
                        help="coco: generate the masks from annotations/instances_{train,val}2017.json (pycocotools) "
                             "instead of reading the authors' masks/")
    parser.add_argument("--overlap", choices=coco.OVERLAPS,
                        help="coco --from-instances: painting order of overlapping instances (default json)")
    parser.add_argument("--crowd", choices=coco.CROWDS,
                        help="coco --from-instances: crowd regions painted as their class, 255, or not (default class)")
    parser.add_argument("--compare-to", metavar="MASKS_DIR",
                        help="coco --from-instances: compare the generated masks with MASKS_DIR/<id>.png; writes "
                             "OUT/coco_compare.json, no dataset")
    parser.add_argument("--labels", choices=ade20k.LABELS,
                        help="ade20k: raw official annotations (0 -> 255, v -> v-1) or already reduced (default raw)")
    args = parser.parse_args(argv)
    if args.dataset == "synthetic" and args.raw:
        parser.error("synthetic is generated, it takes no --raw")
    if args.dataset != "synthetic" and not args.raw:
        parser.error(f"{args.dataset} needs --raw DIR")
    given = {dest: value for dest, value in vars(args).items() if dest in OPTIONS and value is not None}
    for dest in given:
        dataset, needs = OPTIONS[dest]
        if args.dataset != dataset:
            parser.error(f"{_flag(dest)} applies to {dataset} only")
        if needs and needs not in given:
            parser.error(f"{_flag(dest)} needs {_flag(needs)}")
    options = {k: v for k, v in given.items() if k != "compare_to"}
    try:
        if args.dataset == "synthetic":
            builder = synthetic.Synthetic(data_dir=args.out, num_train=args.num_train, num_val=args.num_val,
                                          image_size=(args.min_size, args.max_size), seed=args.seed)
        else:
            builder = BUILDERS[args.dataset](data_dir=args.out, raw_dir=args.raw, num_workers=args.num_workers,
                                             **options)
        if args.compare_to:
            report_path = pathlib.Path(args.out) / "coco_compare.json"
            print(coco.summary(coco.compare(builder, args.compare_to, report_path)))
            print(f"report: {report_path}")
            return 0
        path, status = common.prepare(builder, rebuild=args.rebuild)
    except (common.DataPrepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(MESSAGES[status].format(args.dataset, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
