r"""CSL selector numerics at many classes: float32 csl_jax against the float64 SVD reference.

    python -m benchmarks.csl_numerics --out csl_numerics.json          # C 21 / 81 / 150, 4 images of 257 x 257
    python -m benchmarks.csl_numerics --size 65 --images 2             # quick

The residual variance v = sum_{c != k*} (P_c - m)^2 / (C - 1), m = (1 - conf) / (C - 1), sums C - 1
small terms per pixel, and the split's moments sum N = H W pixels per image, so the float32 error
could grow with C (COCO 81, ADE20K 150) and with the crop. For every class count and both
`variance_scaling` settings, softmax maps from near-uniform to saturated
(tests/helpers/csl_reference.softmax_maps: per-image margin scale spread over [0.05, 50]) go
through `csl_weights` / `csl_statistics` (float32, jit) and through the NumPy float64 reference
(tests/helpers/csl_reference.py) twice:
- features: conf and v in float32 against float64 from the same probabilities (relative error of v
  over pixels whose unscaled v >= 1e-30; below that float32 has denormals only, and those saturated
  pixels get weight 1 from their confidence whatever v is);
- split on the same features: csl_jax's closed form against the SVD on csl_jax's own float32
  features in float64 (pixels assigned to another cluster, weights);
- end to end: every step in float64 from the same probabilities (pixels assigned differently,
  images whose reliable cluster differs, weights).
Prints one JSON line per setting, writes the report to --out and prints the table last.
"""
import argparse
import functools
import json

import jax
import numpy as np

from csl_jax.methods.parts import pseudo_labels as pl
from tests.helpers.csl_reference import ref_features, ref_image, softmax_maps


@functools.partial(jax.jit, static_argnames=("variance_scaling",))
def _csl(probs, valid, variance_scaling):
    return pl.csl_weights(probs, valid, variance_scaling=variance_scaling)[0], pl.csl_statistics(
        probs, valid, variance_scaling)


def measure(num_classes: int, variance_scaling: bool, size: int, images: int, seed: int = 0) -> dict:
    """Errors of the float32 selector at one class count (see the module docstring)."""
    probs = softmax_maps(seed, num_images=images, size=size, num_classes=num_classes)
    valid = np.ones(probs.shape[:3], bool)
    weights, stats = jax.device_get(_csl(probs, valid, variance_scaling))
    conf64, var64 = ref_features(probs, variance_scaling)
    big = ref_features(probs)[1] >= 1e-30  # unscaled v: float32 keeps only denormals below this
    row = {"classes": num_classes, "variance_scaling": variance_scaling, "size": size, "images": images,
           "conf_max_rel_err": float(np.max(np.abs(stats.conf - conf64) / conf64)),
           "var_max_rel_err": float(np.max(np.abs(stats.var[big] - var64[big]) / var64[big]))}
    same, e2e = [], []
    for b in range(images):
        w, a, r, _ = ref_image(np.float64(stats.conf[b]), np.float64(stats.var[b]), valid[b])
        same.append((np.mean(a != stats.assignment[b]), np.max(np.abs(w - weights[b])), r != stats.reliable[b]))
        w, a, r, _ = ref_image(conf64[b], var64[b], valid[b])
        e2e.append((np.mean(a != stats.assignment[b]), np.max(np.abs(w - weights[b])), r != stats.reliable[b],
                    np.mean(np.abs(w - weights[b]))))
    same, e2e = np.array(same, np.float64), np.array(e2e, np.float64)
    row.update(split_assign_diff=float(same[:, 0].max()), split_weight_max_abs=float(same[:, 1].max()),
               split_reliable_diff=int(same[:, 2].sum()), e2e_assign_diff=float(e2e[:, 0].max()),
               e2e_weight_max_abs=float(e2e[:, 1].max()), e2e_weight_mean_abs=float(e2e[:, 3].mean()),
               e2e_reliable_diff=int(e2e[:, 2].sum()))
    return row


COLUMNS = [("classes", "C", "d"), ("variance_scaling", "scaled", ""), ("conf_max_rel_err", "conf rel", ".1e"),
           ("var_max_rel_err", "v rel", ".1e"), ("split_assign_diff", "split assign", ".1e"),
           ("split_weight_max_abs", "split w", ".1e"), ("e2e_assign_diff", "e2e assign", ".1e"),
           ("e2e_weight_max_abs", "e2e w max", ".1e"), ("e2e_weight_mean_abs", "e2e w mean", ".1e"),
           ("e2e_reliable_diff", "e2e reliable", "d")]


def print_table(rows: list[dict]) -> None:
    """The report as a Markdown table (errors are max over pixels and images unless 'mean')."""
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(format(row[key], fmt) if fmt else str(row[key]) for key, _, fmt in COLUMNS) + " |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 81, 150])
    parser.add_argument("--size", type=int, default=257, help="image side (pixels)")
    parser.add_argument("--images", type=int, default=4, help="images per setting (margin scales spread)")
    parser.add_argument("--out", help="JSON report path")
    args = parser.parse_args(argv)
    rows = []
    for num_classes in args.classes:
        for variance_scaling in (False, True):
            rows.append(measure(num_classes, variance_scaling, args.size, args.images))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "csl_numerics", "args": vars(args), "rows": rows}, f, indent=2)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
