r"""Speed of the real train steps (supervised, UniMatch, CSL, UniMatch V2): step time, compile time, memory, MFU.

    python -m benchmarks.train_step --method csl unimatch --depth 101 --output-stride 16 \
        --crop 513 --dtype bfloat16 --out train_step.json [--torch] [--peak-tflops 798]
    python -m benchmarks.train_step --method unimatch_v2 --encoder small base --crop 518 \
        --labeled 16 --unlabeled 16 --dtype bfloat16 [--remat]      # UniMatch V2 on DINOv2 + DPT
    python -m benchmarks.train_step --tiny    # CPU smoke test (tiny model, crop 33 / 28 (DPT), 2 + 2)
    python -m benchmarks.train_step --cost-model-only --method unimatch_v2 --encoder small base large \
        --labeled 16 --unlabeled 16          # the cost model alone: no device, no compilation

`--kernels fast reference` times every configuration twice: with the train-time kernels (fused
BatchNorm, GEMM weight gradients of the dilated convs, bf16 logit resize: docs/models.md "Train-time
kernels"; the default) and with the plain JAX formulations they replace (the before/after of issue 27).

`--compilation-cache DIR` turns on the persistent XLA cache (a first process measures the cold
compile and fills it, a second with `--compile-only` measures the warm one); `--profile-dir DIR`
traces a few extra steps of each configuration with jax.profiler (see benchmarks/profile_summary.py)
with command buffers (CUDA graphs) kept on while profiling (it adds
`--xla_enable_command_buffers_during_profiling=true` to XLA_FLAGS: XLA's default switches to op-by-op
launches under a profiler); `--hlo-dump DIR` dumps the HLO text of every compiled program there (see
benchmarks/hlo_stats.py); `--xla-flags=...` adds any XLA flags. XLA reads XLA_FLAGS once, when JAX
initialises its backend: `main` sets them first and refuses (exit with a message) in a process whose
backend already runs. The report records `xla_flags` (in effect), `xla_flags_added` and
`command_buffers_during_profiling`. `--compare LABEL=REPORT ...` tabulates earlier reports (one per
flag variant: compile s, ms/step back to back and synced, dispatch ms) without running anything.

Each configuration builds the method from the Pascal config of that method (configs/*_pascal.py,
so the method options are the real ones), overrides model and batch, and times
`csl_jax.train.make_train_step` on synthetic batches of the right shapes (no data pipeline, so
the step time is pure device time). UniMatch V2's methods (`unimatch_v2`, `fixmatch_v2`, and
`supervised_v2`: the supervised baseline on the DPT) take `configs.common.get_v2_recipe('pascal')`
with `--encoder` (small | base | large | giant; `--tiny`: `common.TINY_DPT`) instead of `--depth` and
`--output-stride`, and `--crop` a multiple of 14; their batch has no mix stream. After --warmup
steps, --iters steps are timed twice: each ended by block_until_ready (`ms_per_step_synced`, their
median, and `ms_per_step_min`: these include the host's launch latency before the device starts),
then queued back to back and waited for once, as the training loop runs them (`ms_per_step`, the
throughput figure every other field uses); then `dispatch_ms`: the time until `compiled(state, batch)`
returns when called right after a `block_until_ready` (no profiler; median of DISPATCH_SAMPLES = 5,
`dispatch_ms_min`), the host's cost of launching one step. Reported per configuration:

- ms/step and images/s (labeled + unlabeled images of one step);
- lower and compile seconds, timed separately;
- peak device memory (`memory_stats()['peak_bytes_in_use']`, monotonic over the process; 'n/a'
  where the backend has none, e.g. CPU) and XLA's own estimate of the step's memory
  (`memory_analysis()`: arguments + outputs + temporaries - aliased);
- TFLOP per step from XLA's cost analysis (summed over devices) next to the cost model, and their
  ratio: for DeepLabV3+ /work/shared/docs/performance.md (table 1 forward FLOPs x the pass count of
  table 2; 'n/a' where the table has no entry: other crops, the tiny model), for the DPT the
  analytic count below (any crop, the tiny model too);
- MFU = XLA FLOPs / step time / peak, with the peak from --peak-tflops (`peak_source` 'flag') or
  measured with a large bf16 matmul on the device in this process before the steps (`peak_source`
  'measured-in-process', `peak_method`; `peak_tflops_end` is the same matmul after the steps, a
  check of the clock, not used); and mfu_reference, the same with the cost model's FLOPs. XLA counts
  only the kernel taps that land inside the input, the cost model (PyTorch's FlopCounterMode)
  counts every tap, so XLA's figure is lower where dilated taps read padding (ASPP at OS8).

Cost model of the DINOv2 + DPT (`dpt_forward_flops`), FLOPs = 2 per multiply-add, one H x W image,
patch p = 14, token grid h = H/p, w = W/p, n = hw patches, N = n + 1 tokens, width D, L blocks, FFN
hidden F (4D; giant's SwiGLU 4096):

- patch embedding: 2 n (3 p^2) D;
- per block: qkv and proj 2 N (3D^2 + D^2) = 8 N D^2; attention scores q k^T and values a v
  2 N^2 D each = 4 N^2 D; FFN: MLP 2 N (2 D F) = 16 N D^2, SwiGLU 2 N (D 2F + F D) = 6 N D F.
  LayerNorms, softmax, GELU, LayerScale, residual and bias adds are elementwise: not counted (XLA
  counts them: 2% of ViT-S's forward at 518, ~4% of the tiny model's); nor is the final norm;
- DPT head, convs at their resolutions (maps of 4h x 4w, 2h x 2w, h x w and ceil(h/2) x ceil(w/2)):
  projects 1x1 D -> c_k; ConvTranspose k = s = 4, 2 (one tap per output pixel: 2 (s^2 hw) c_k^2);
  the 3x3/2 conv; layer{k}_rn 3x3 c_k -> f; per fusion block its RCUs (two 3x3 f -> f each) at
  the input level and out_conv 1x1 f -> f at the output level; output_conv 3x3 f -> f and 1x1
  f -> C at 8h x 8w. A k x k conv costs 2 Cin Cout x (taps summed over the output positions):
  every tap (k per output and axis, PyTorch's convention) in the reported model FLOPs, the taps
  that read inside the input with `in_bounds=True` (XLA's convention: `tests/test_benchmarks.py`
  checks it equals XLA's count of every dot and convolution of a tiny forward, exactly);
- not model FLOPs, reported apart as `resize`: csl_jax's bilinear resizes (align_corners) are
  dense interpolation matmuls, 2 c (H_o H_i W_i + W_o W_i H_o) each (the four fusion resizes and the
  output's 8h -> H on C classes: 7% of ViT-S's model FLOPs at 518), which XLA counts as dots; PyTorch
  interpolates with 4 taps per output. XLA's count of the ViT-S forward at 518 is 1.09x the model FLOPs;
- left out: the position table's bicubic resize (per call, not per image; the identity at the stored
  37 x 37 grid, i.e. at crop 518), the Complementary Dropout scaling, losses and optimizer.

Per step (`forward_passes`): a backward pass counts twice its forward, so UniMatch V2 costs
B_u (the EMA teacher on u_w, no grad) + 3 (B_l + 2 B_u) (the student on x and on [S1; S2]) image
forwards; FixMatch V2 B_u + 3 (B_l + B_u); supervised 3 B_l. Not modelled: the patch embedding's
missing input gradient and the resizes' backward (constant matrices: only the input gradient,
1x their forward, not 2x), and `lock_backbone`.

With --torch, benchmarks/torch_reference.py runs the same configurations first, in a subprocess
(before JAX claims the accelerator's memory; --torch-compile, --torch-strict-fp32 and --torch-args
pass on), its rows land in the same report (`torch_results`), and the table shows JAX's speed-up over
each torch variant (`attach_torch`: bf16, TF32 = PyTorch's default float32, fp32 = TF32 off, and
their torch.compile rows). Prints
one line per configuration while running, writes the JSON report, and prints the table last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.model_forward import random_like
from configs import (ccvc_pascal, common, cpcl_pascal, csl_pascal, css_pascal, supervised_pascal, u2pl_pascal,
                     unimatch_pascal)
from csl_jax import optim, parallel, train
from csl_jax.methods import build_method
from csl_jax.models import build_model, layers
from csl_jax.models.dpt import DPT

METHOD_CONFIGS = {"supervised": supervised_pascal, "unimatch": unimatch_pascal, "csl": csl_pascal,
                  "ccvc": ccvc_pascal, "u2pl": u2pl_pascal, "css": css_pascal, "cpcl": cpcl_pascal}
#: UniMatch V2's methods on the DPT: benchmark name -> (`common.get_v2_recipe` method, variant)
V2_METHODS = {"unimatch_v2": ("unimatch_v2", ""), "fixmatch_v2": ("unimatch_v2", "fixmatch_v2"),
              "supervised_v2": ("supervised", "")}
#: default --crop per model, (full size, --tiny)
DEFAULT_CROP = {"deeplabv3plus": (513, 33), "dpt": (518, 28)}
ENCODER_LABELS = {"small": "ViT-S", "base": "ViT-B", "large": "ViT-L", "giant": "ViT-g"}
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

# performance.md table 1: GFLOP of one forward pass per image, 21 classes, keyed (depth, OS) -> crop.
FORWARD_GFLOPS = {
    (101, 16): {321: 80, 513: 200, 769: 443, 801: 481},
    (101, 8): {321: 219, 513: 550, 769: 1226, 801: 1329},
    (50, 16): {321: 63, 513: 159, 769: 352, 801: 382},
    (50, 8): {321: 155, 513: 390, 769: 870, 801: 943},
}
# Share of the ASPP + decoder in the R101 forward FLOPs (performance.md §1); the head is the same
# for R50, so its share there is scaled by the R101/R50 FLOP ratio.
HEAD_SHARE_R101 = {16: 0.38, 8: 0.31}
PEAK_MATMUL = {"accelerator": (8192, jnp.bfloat16), "cpu": (512, jnp.float32)}
#: calls timed for `dispatch_ms` (each right after a sync, no profiler): the median
DISPATCH_SAMPLES = 5
#: XLA's default turns command buffers (CUDA graphs) off under a profiler; --profile-dir turns them on
PROFILING_FLAG = "--xla_enable_command_buffers_during_profiling"


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------
def forward_passes(method_opts, labeled: int, unlabeled: int, head_share: float) -> float:
    """Image forward passes F per step (performance.md §2; a backward pass counts 2F).

    UniMatch V2 and FixMatch V2 (DPT): the EMA teacher's no-grad pass on u_w B_u, the student's
    train passes on x and on the strong views 3 (B_l + 2 B_u) (one strong view: 3 (B_l + B_u)).

    Supervised: 3 B_l. Semi-supervised: no-grad pseudo-label passes (EMA teacher on [u_w; u'_w]:
    2 B_u, else the mix batch: B_u) + main pass 3 (B_l + B_u) (x (1 + head share) with FP, whose
    head runs twice) + strong pass 3 B_u per strong view. CCVC: two networks, each with a labeled
    train pass 3 B_l, a no-grad eval pass B_u and the mixed and raw train passes 3 B_u each (its
    304x304 mapping is left out). U2PL (after its supervised-only epochs): the eval-mode teacher
    on u B_u, the student's train pass 3 (B_l + B_u) and the teacher's no-grad train pass
    B_l + B_u (its decoder, with the representation head, counted as UniMatch's). CSS: the EMA
    teacher's no-grad train passes on x and u B_l + B_u and the student's train passes on x and u~
    3 (B_l + B_u) (its classifier and representation heads counted as UniMatch's decoder). CPCL: two
    networks, each with train passes on x and x_mix 3 (B_l + B_u) and no-grad train passes on u0
    and u1 2 B_u (its CPS head counted as UniMatch's decoder).
    """
    if method_opts.name == "supervised":
        return 3.0 * labeled
    if method_opts.name in V2_METHODS:
        return unlabeled + 3.0 * (labeled + unlabeled * (1 if method_opts.second_view == "none" else 2))
    if method_opts.name == "u2pl":
        return unlabeled + 4.0 * (labeled + unlabeled)
    if method_opts.name == "css":
        return 4.0 * (labeled + unlabeled)
    if method_opts.name == "ccvc":
        return 2 * (3.0 * labeled + unlabeled + 6.0 * unlabeled)
    if method_opts.name == "cpcl":
        return 2 * (3.0 * labeled + 5.0 * unlabeled)
    no_grad = 2 * unlabeled if method_opts.teacher == "ema" else unlabeled
    main = 3.0 * (labeled + unlabeled) * ((1.0 + head_share) if method_opts.use_fp else 1.0)
    strong = 3.0 * unlabeled * (1 if method_opts.second_view == "none" else 2)
    return no_grad + main + strong


def conv_taps(n: int, k: int, stride: int, in_bounds: bool) -> tuple[int, int]:
    """(kernel taps summed over the output positions, output size) along one axis of n inputs of a
    k x k conv with PyTorch's padding (k - 1) / 2: k per output, or with `in_bounds` only the taps
    that read inside the input (XLA's count)."""
    pad = (k - 1) // 2
    out = (n + 2 * pad - k) // stride + 1
    if not in_bounds:
        return out * k, out
    return sum(1 for o in range(out) for i in range(k) if 0 <= o * stride - pad + i < n), out


def conv_flops(size: tuple[int, int], k: int, stride: int, cin: int, cout: int,
               in_bounds: bool) -> tuple[int, tuple[int, int]]:
    """(FLOPs, output (h, w)) of a k x k conv of one (h, w, cin) map to cout channels (bias not counted)."""
    (taps_h, out_h), (taps_w, out_w) = (conv_taps(n, k, stride, in_bounds) for n in size)
    return 2 * taps_h * taps_w * cin * cout, (out_h, out_w)


def resize_flops(size_in: tuple[int, int], size_out: tuple[int, int], channels: int) -> int:
    """FLOPs of csl_jax's bilinear resize of one (h, w, channels) map: rows then columns by dense
    interpolation matrices (`layers.resize_align_corners`); 0 when the size does not change."""
    if tuple(size_in) == tuple(size_out):
        return 0
    (h_in, w_in), (h_out, w_out) = size_in, size_out
    return 2 * channels * (h_out * h_in * w_in + w_out * w_in * h_out)


def dpt_forward_flops(model: DPT, height: int, width: int, in_bounds: bool = False) -> dict[str, int]:
    """FLOPs of one DINOv2 + DPT forward of one height x width image (module docstring), by part.

    Returns {'patch_embed', 'linear' (qkv, proj, FFN of every block), 'attention' (q k^T and a v),
    'head' (the DPT's convs), 'resize' (csl_jax's interpolation matmuls, not model FLOPs)}.
    `in_bounds`: count only the conv taps that read inside the input, as XLA does.
    """
    p, d = model.patch_size, model.embed_dim
    h, w = height // p, width // p
    n = h * w
    tokens = n + 1
    hidden = 4 * d if model.ffn == "mlp" else (int(4 * d * 2 / 3) + 7) // 8 * 8
    ffn = 2 * tokens * d * 2 * hidden if model.ffn == "mlp" else 2 * tokens * 3 * d * hidden
    c, f = model.out_channels, model.features
    head = 2 * n * d * sum(c) + 2 * 16 * n * c[0] ** 2 + 2 * 4 * n * c[1] ** 2  # projects, ConvTransposes 4, 2
    down, l4 = conv_flops((h, w), 3, 2, c[3], c[3], in_bounds)
    sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), l4]  # l1..l4
    head += down + sum(conv_flops(s, 3, 1, ck, f, in_bounds)[0] for s, ck in zip(sizes, c))

    def rcu(size):
        return 2 * conv_flops(size, 3, 1, f, f, in_bounds)[0]

    resize = 0
    # refinenet4: RCU2 on l4 -> l3's size; refinenet3..1: RCU1 (skip) and RCU2 -> l2, l1, 8h x 8w
    fusions = [(l4, sizes[2], 1), (sizes[2], sizes[1], 2), (sizes[1], sizes[0], 2), (sizes[0], (8 * h, 8 * w), 2)]
    for size_in, size_out, units in fusions:
        head += units * rcu(size_in) + 2 * size_out[0] * size_out[1] * f * f  # RCUs, out_conv 1x1
        resize += resize_flops(size_in, size_out, f)
    head += conv_flops((8 * h, 8 * w), 3, 1, f, f, in_bounds)[0] + 2 * 64 * n * f * model.num_classes
    resize += resize_flops((8 * h, 8 * w), (height, width), model.num_classes)
    return {"patch_embed": 2 * n * 3 * p * p * d, "linear": model.depth * (8 * tokens * d * d + ffn),
            "attention": model.depth * 4 * tokens * tokens * d, "head": head, "resize": resize}


def forward_gflops(config, num_classes: int = 21) -> float | None:
    """Cost-model GFLOP of one image's forward: the DPT's model FLOPs (`dpt_forward_flops`, every tap,
    resizes left out) at any crop; DeepLabV3+ from performance.md table 1 (21 classes), None off it."""
    crop = config.data.crop_size
    if config.model.get("name") == "dpt":
        parts = dpt_forward_flops(build_model(config.model, num_classes), crop, crop)
        return sum(v for k, v in parts.items() if k != "resize") / 1e9
    model = config.model
    if model.blocks is not None or model.width != 64 or model.head_width != 256:
        return None
    return FORWARD_GFLOPS.get((model.depth, model.output_stride), {}).get(crop)


def reference_tflops(config, num_classes: int = 21) -> float | None:
    """TFLOP per step of `config` from the cost model, None where it has no entry (`forward_gflops`)."""
    gflops = forward_gflops(config, num_classes)
    if gflops is None:
        return None
    if config.model.get("name") == "dpt":
        return forward_passes(config.method, config.batch.labeled, config.batch.unlabeled, 0.0) * gflops / 1e3
    stride = config.model.output_stride
    head_share = HEAD_SHARE_R101[stride] * FORWARD_GFLOPS[(101, stride)][config.data.crop_size] / gflops
    passes = forward_passes(config.method, config.batch.labeled, config.batch.unlabeled, head_share)
    return passes * gflops / 1e3


# ---------------------------------------------------------------------------------------------
# Configurations and synthetic batches
# ---------------------------------------------------------------------------------------------
def make_config(method: str, depth: int, output_stride: int, crop: int, dtype: str, labeled: int,
                unlabeled: int, tiny: bool = False, remat: bool = False):
    """The method's Pascal config with the benchmark's model (`common.TINY_MODEL` if `tiny`), crop, batch."""
    c = METHOD_CONFIGS[method].get_config()
    c.model.init_from = "none"  # timing only: random weights, nothing to download
    c.model.depth = depth
    c.model.output_stride = output_stride
    c.model.aspp_rates = ASPP_RATES[output_stride]
    c.model.dtype = dtype
    c.model.remat = remat
    if tiny:
        common.tiny_model(c)
    c.data.crop_size = crop
    c.batch.labeled = labeled
    c.batch.unlabeled = unlabeled
    c.loss.group_size = min(c.loss.group_size, labeled, unlabeled)  # the reference's 2, or the whole batch
    if method == "ccvc":  # CutMix partner groups of the loss group
        c.method.mix_group = c.loss.group_size
    if method == "u2pl" and tiny:  # CPU smoke test: small memory bank and representation
        c.model.rep_dim = 16
        c.method.update(queue_capacity=1000, queue_capacity_class0=1500)
    if method == "css" and tiny:  # CPU smoke test: small representation and contrastive sample
        c.model.rep_dim = 16
        c.method.update(num_queries=16, num_negatives=32)
    return c


def make_v2_config(method: str, encoder: str, crop: int, dtype: str, labeled: int, unlabeled: int,
                   tiny: bool = False, remat: bool = False):
    """UniMatch V2's Pascal recipe of `method` (a V2_METHODS name: `common.get_v2_recipe`, AdamW, the
    method's options) with the DPT of `encoder` (`common.TINY_DPT` if `tiny`), random weights, crop, batch."""
    recipe_method, variant = V2_METHODS[method]
    c = common.get_v2_recipe("pascal", ",".join(filter(None, ["1464", encoder, variant])), recipe_method)
    c.model.update(init_from="none", dtype=dtype, remat=remat)  # timing only: random weights
    if tiny:
        c.model.update(common.TINY_DPT)
    c.data.crop_size = crop
    c.batch.labeled = labeled
    c.batch.unlabeled = unlabeled
    c.loss.group_size = min(c.loss.group_size, labeled, unlabeled)  # the reference's 4 (Pascal), or the batch
    return c


def configurations(args):
    """(config, profile name) of every configuration of the grid, in order: per method, DeepLabV3+
    depth x output stride x crop x dtype, or DPT encoder x crop x dtype (default crops DEFAULT_CROP)."""
    for method in args.method:
        model = "dpt" if method in V2_METHODS else "deeplabv3plus"
        crops = args.crop or [DEFAULT_CROP[model][args.tiny]]
        if model == "dpt":
            for encoder, crop, dtype in itertools.product(args.encoder, crops, args.dtype):
                yield (make_v2_config(method, encoder, crop, dtype, args.labeled, args.unlabeled, args.tiny,
                                      args.remat), f"{method}_{dtype}_{encoder}_{crop}")
            continue
        for depth, stride, crop, dtype in itertools.product(args.depth, args.output_stride, crops, args.dtype):
            yield (make_config(method, depth, stride, crop, dtype, args.labeled, args.unlabeled, args.tiny,
                               args.remat), f"{method}_{dtype}_os{stride}_{crop}")


def model_keys(config) -> dict:
    """The model fields of a result: depth and output_stride (DeepLabV3+), or the DPT's encoder (both None)."""
    if config.model.get("name") == "dpt":
        return {"encoder": config.model.encoder, "depth": None, "output_stride": None}
    return {"depth": config.model.depth, "output_stride": config.model.output_stride}


def unlabeled_views(method) -> tuple[str, ...] | None:
    """The views of a method's 'unlabeled' stream, or None when it has none (supervised)."""
    spec = method.streams().get("unlabeled")
    return None if spec is None else spec.views


def batch_streams(method, config) -> tuple[str, ...]:
    """The unlabeled streams of the synthetic batch: those the DPT's methods read (no mix stream); the
    DeepLabV3+ methods keep the 'unlabeled' and 'mix' of every earlier report (CCVC, U2PL, CSS read no mix)."""
    if config.model.get("name") == "dpt":
        return tuple(s for s in method.streams() if s != "labeled")
    return ("unlabeled", "mix")


def synthetic_batch(views: tuple[str, ...] | None, labeled: int, unlabeled: int, crop: int, num_classes: int,
                    seed: int = 0, labeled_views: tuple[str, ...] = (),
                    streams: tuple[str, ...] = ("unlabeled", "mix")) -> dict:
    """Random host batch with the pipeline's keys, shapes and dtypes (csl_jax/data/pipeline.py).

    labeled: image (B_l, crop, crop, 3) float32, label (B_l, crop, crop) int32 (255 on a border).
    Unless `views` is None (supervised), each of `streams` with B_u images: weak and
    `views` (`unlabeled_views(method)`; float32 images), ignore int32 (255 on a border), label
    int32 (all 255), cutmix_box / cutmix_box2 / block_mask (B_u, crop, crop) bool; CSS's
    'css_strong' adds css_strong float32, warp_index int32 (-1 on a border), css_flip (B_u,) bool and
    css_box bool, and its labeled view 'css_photometric' (in `labeled_views`) css_image float32.
    """
    rng = np.random.default_rng(seed)
    border = max(1, crop // 16)

    def images(n):
        return rng.standard_normal((n, crop, crop, 3), dtype=np.float32)

    def boxes(n):
        y, x = np.mgrid[:crop, :crop]
        corners = rng.integers(0, crop // 2, size=(n, 2))
        return np.stack([(y >= a) & (y < a + crop // 2) & (x >= b) & (x < b + crop // 2) for a, b in corners])

    label = rng.integers(0, num_classes, size=(labeled, crop, crop)).astype(np.int32)
    label[:, -border:] = 255
    batch = {"labeled": {"image": images(labeled), "label": label}}
    if "css_photometric" in labeled_views:
        batch["labeled"]["css_image"] = images(labeled)
    if views is None:
        return batch
    for stream in streams:
        ignore = np.zeros((unlabeled, crop, crop), np.int32)
        ignore[:, -border:] = 255
        arrays = {"weak": images(unlabeled), "ignore": ignore,
                  "label": np.full((unlabeled, crop, crop), 255, np.int32)}
        for view in views:
            if view in ("u2pl_box", "cpcl_mask"):  # U2PL's in-batch CutMix box, CPCL's 3-box mask: a mask only
                arrays[view] = boxes(unlabeled)
                continue
            if view == "css_strong":  # CSS: warped strong image, its source index, flip bit, CutMix box
                index = rng.integers(0, crop * crop, size=(unlabeled, crop, crop)).astype(np.int32)
                index[:, -border:] = -1
                arrays.update(css_strong=images(unlabeled), warp_index=index, css_box=boxes(unlabeled),
                              css_flip=rng.random(unlabeled) < 0.5)
                continue
            arrays[view] = images(unlabeled)
            mask_key = {"strong": "cutmix_box", "strong2": "cutmix_box2", "tmp": "block_mask"}[view]
            arrays[mask_key] = boxes(unlabeled) if view != "tmp" else rng.random((unlabeled, crop, crop)) < 0.5
        batch[stream] = arrays
    return batch


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def measure_peak_tflops(size: int, dtype, iters: int = 5, chain: int = 20, warmup_s: float = 1.0) -> float:
    """TFLOP/s of a jitted (size, size) x (size, size) matmul in `dtype`.

    The operands are random normal (constant data such as ones or zeros runs measurably faster on
    GPUs). The matmul first runs for `warmup_s` seconds (an idle GPU starts at a low clock), then
    each of `iters` timings covers `chain` matmuls queued back to back (no launch gaps); the median.
    """
    a, b = (jax.random.normal(key, (size, size), dtype) for key in jax.random.split(jax.random.PRNGKey(0)))
    matmul = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready([matmul(a, b) for _ in range(chain)])
        times.append((time.perf_counter() - start) / chain)
    return 2.0 * size ** 3 / statistics.median(times) / 1e12


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of the compiled (per-device) program from XLA's cost analysis, or None."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def xla_memory_gib(compiled) -> float | None:
    """XLA's estimate of the step's device memory (args + outputs + temporaries - aliased), GiB."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2 ** 30


def peak_memory_gib(device) -> float | None:
    """`peak_bytes_in_use` of `device` in GiB (monotonic over the process), None when unavailable."""
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def bench_one(config, devices, num_classes: int, warmup: int, iters: int, peak_tflops: float,
              compile_only: bool = False, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """Compiles and times the train step of `config` on `devices`; returns one result dict.

    `compile_only`: lower and compile, then stop (the timing, FLOP and memory fields are None).
    `profile_dir`: after timing, trace `profile_steps` more steps with `jax.profiler.trace` there.
    """
    mesh = parallel.make_mesh(devices)
    method = build_method(config, num_classes)
    views = unlabeled_views(method)
    labeled, unlabeled = config.batch.labeled, config.batch.unlabeled
    parallel.check_divisible(labeled, "--labeled", mesh, config.loss.group_size)
    if views is not None:
        parallel.check_divisible(unlabeled, "--unlabeled", mesh, config.loss.group_size)
    crop = config.data.crop_size
    tx = optim.make_optimizer(config.optim, total_steps=10 ** 6, param_labels=method.param_labels)
    abstract = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), (crop, crop, 3)))
    # random floats; integer state (U2PL's queue pointers and counters) keeps its dtype, at zero
    params, method_state = jax.tree.map(lambda x, a: x.astype(a.dtype), random_like(abstract), abstract)
    state = parallel.replicate(train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                opt_state=tx.init(params), state=method_state), mesh)
    batch = parallel.to_global(synthetic_batch(views, labeled, unlabeled, crop, num_classes,
                                               labeled_views=method.streams()["labeled"].views,
                                               streams=batch_streams(method, config)), mesh)
    step = train.make_train_step(method, tx, mesh, config.seed, steps_per_epoch=1,
                                 offsets=train.stream_offsets(method, config.batch))

    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    images = labeled + (unlabeled if views is not None else 0)
    result = {
        "method": config.method.name, **model_keys(config), "crop": crop, "dtype": config.model.dtype,
        "remat": config.model.remat, "labeled": labeled, "unlabeled": unlabeled if views is not None else 0,
        "devices": len(devices),
        "lower_s": lower_s, "compile_s": compile_s, "compile_only": compile_only,
    }
    if compile_only:
        return result

    metrics = None
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))
    times = []  # each step waited for: includes the launch latency before the device starts
    for _ in range(iters):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()  # queued back to back, as the training loop runs them
    for _ in range(iters):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / iters
    dispatch = []  # the call alone, right after a sync: the host's cost of launching one step
    for _ in range(DISPATCH_SAMPLES):
        jax.block_until_ready(state)
        start = time.perf_counter()
        out = compiled(state, batch)
        dispatch.append(time.perf_counter() - start)
        state, metrics = jax.block_until_ready(out)
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(profile_steps):
                state, metrics = jax.block_until_ready(compiled(state, batch))

    flops = xla_flops(compiled)
    xla_tflops = None if flops is None else flops * len(devices) / 1e12
    ref = reference_tflops(config, num_classes)
    return dict(
        result, ms_per_step=1e3 * step_s, ms_per_step_synced=1e3 * statistics.median(times),
        ms_per_step_min=1e3 * min(times), dispatch_ms=1e3 * statistics.median(dispatch),
        dispatch_ms_min=1e3 * min(dispatch), images_per_s=images / step_s,
        peak_memory_gib=peak_memory_gib(devices[0]), xla_memory_gib=xla_memory_gib(compiled),
        xla_tflops_per_step=xla_tflops, forward_gflops=forward_gflops(config, num_classes),
        reference_tflops_per_step=ref,
        xla_vs_reference=None if xla_tflops is None or ref is None else xla_tflops / ref,
        achieved_tflops=None if xla_tflops is None else xla_tflops / step_s / len(devices),
        mfu=None if xla_tflops is None else xla_tflops / step_s / (peak_tflops * len(devices)),
        mfu_reference=None if ref is None else ref / step_s / (peak_tflops * len(devices)),
        final_loss=float(metrics["loss"]),
    )


# ---------------------------------------------------------------------------------------------
# PyTorch comparison
# ---------------------------------------------------------------------------------------------
def torch_command(args) -> list[str]:
    """The command line of benchmarks/torch_reference.py for the grid of `args` (run by `run_torch`)."""
    out = args.out + ".torch.json"
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--out", out, "--method", *args.method,
           "--num-classes", str(args.num_classes)]
    if args.crop:
        cmd += ["--crop", *map(str, args.crop)]
    if any(m in V2_METHODS for m in args.method):
        cmd += ["--encoder", *args.encoder]
    if args.tiny:
        cmd.append("--tiny")
    else:
        dtypes = sorted(set(args.dtype) | {"float32"})  # the float32 (TF32) baseline is always wanted
        cmd += ["--depth", *map(str, args.depth), "--output-stride", *map(str, args.output_stride),
                "--dtype", *dtypes, "--labeled", str(args.labeled), "--unlabeled", str(args.unlabeled),
                "--warmup", str(args.warmup), "--iters", str(args.iters)]
    if args.torch_compile:
        cmd += ["--compile", "--compile-mode", args.torch_compile_mode]
    if args.torch_strict_fp32:
        cmd.append("--strict-fp32")
    return cmd + shlex.split(args.torch_args)


def run_torch(args) -> dict | None:
    """Runs benchmarks/torch_reference.py on the same grid in a subprocess (`torch_command`); its report.

    A failure of the PyTorch side is reported and returns None: the JAX measurements still run.
    """
    cmd = torch_command(args)
    out = cmd[cmd.index("--out") + 1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = subprocess.run(cmd, env=env, cwd=root).returncode
    if code != 0:
        print(f"benchmarks.torch_reference failed (exit {code}); continuing without the PyTorch comparison",
              file=sys.stderr, flush=True)
        return None
    with open(out) as f:
        return json.load(f)


TORCH_KEYS = ("method", "encoder", "depth", "output_stride", "crop", "labeled", "unlabeled")
#: torch_reference's row variants, in table order, and their table headers
TORCH_VARIANTS = {"bf16": "vs bf16", "tf32": "vs TF32", "fp32": "vs fp32", "bf16_compile": "vs bf16c",
                  "tf32_compile": "vs TF32c", "fp32_compile": "vs fp32c"}


def torch_variant(row: dict) -> str:
    """A torch_reference row's variant; rows from before the field: bf16, or float32 = PyTorch's TF32 default."""
    return row.get("variant") or ("bf16" if row["dtype"] == "bfloat16" else "tf32")


def attach_torch(results: list[dict], torch_results: list[dict]) -> None:
    """Adds the PyTorch comparison to each timed result (same model, crop and batch):

    torch_ms_per_step and speedup_vs_torch (the same dtype's eager row: bf16 autocast + channels_last,
    or float32 = TF32); speedup_vs_torch_float32 (against eager float32, i.e. PyTorch's default TF32
    convolutions); and per torch variant (bf16, tf32, fp32 = TF32 off, *_compile = torch.compile):
    torch_ms_by_variant, speedup_vs_torch_by_variant (back to back vs back to back) and
    speedup_synced_vs_torch_by_variant (synchronised vs synchronised).
    """
    for r in (r for r in results if not r["compile_only"]):
        rows = {torch_variant(t): t for t in torch_results if all(t.get(k) == r.get(k) for k in TORCH_KEYS)}
        same, tf32 = rows.get("bf16" if r["dtype"] == "bfloat16" else "tf32"), rows.get("tf32")
        r["torch_ms_per_step"] = same and same["ms_per_step"]
        r["speedup_vs_torch"] = same and same["ms_per_step"] / r["ms_per_step"]
        r["speedup_vs_torch_float32"] = tf32 and tf32["ms_per_step"] / r["ms_per_step"]
        ordered = sorted(rows.items(), key=lambda item: list(TORCH_VARIANTS).index(item[0])
                         if item[0] in TORCH_VARIANTS else len(TORCH_VARIANTS))
        r["torch_ms_by_variant"] = {v: t["ms_per_step"] for v, t in ordered}
        r["speedup_vs_torch_by_variant"] = {v: t["ms_per_step"] / r["ms_per_step"] for v, t in ordered}
        r["speedup_synced_vs_torch_by_variant"] = {v: t["ms_per_step_synced"] / r["ms_per_step_synced"]
                                                   for v, t in ordered}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def model_label(result: dict) -> str:
    """'R101' (DeepLabV3+ depth) or 'ViT-S' (the DPT's encoder) for a result row."""
    encoder = result.get("encoder")
    return ENCODER_LABELS[encoder] if encoder else f"R{result['depth']}"


def print_table(report: dict) -> None:
    """The results as a fixed-width table (the last thing the benchmark prints): ms/step back to back
    (the headline), synchronised, and the dispatch time; with --torch one speed-up column per torch
    variant (vs bf16 = autocast + channels_last, vs TF32 = PyTorch's default float32, vs fp32 = TF32
    off, a trailing c = torch.compile)."""
    peak = report["peak_tflops"]
    print(f"device: {report['device']} x{report['devices']} (jax {report['jax']}); peak "
          f"{_fmt(peak, '.1f')} TFLOP/s ({report['peak_source']}); results in {report['out']}")
    header = (f"{'method':>11} {'model':>5} {'OS':>3} {'crop':>5} {'dtype':>9} {'kernels':>9} {'batch':>6} "
              f"{'ms/step':>9} {'synced':>8} {'disp ms':>7} {'img/s':>8} {'compile s':>9} {'peak GiB':>8} "
              f"{'XLA GiB':>8} {'TFLOP':>8} {'/table':>7} {'MFU %':>6} {'ref %':>6}")
    present = {v for r in report["results"] for v in r.get("speedup_vs_torch_by_variant", {})}
    columns = [v for v in TORCH_VARIANTS if v in present] + sorted(present - set(TORCH_VARIANTS))
    header += "".join(f" {TORCH_VARIANTS.get(v, v):>8}" for v in columns)
    print(header)
    for r in report["results"]:
        g = r.get
        line = (f"{r['method']:>11} {model_label(r):>5} {r['output_stride'] or '-':>3} {r['crop']:>5} "
                f"{r['dtype']:>9} {g('kernels', 'fast'):>9} {str(r['labeled']) + '+' + str(r['unlabeled']):>6} "
                f"{_fmt(g('ms_per_step'), '.1f'):>9} {_fmt(g('ms_per_step_synced'), '.1f'):>8} "
                f"{_fmt(g('dispatch_ms'), '.2f'):>7} {_fmt(g('images_per_s'), '.1f'):>8} "
                f"{r['lower_s'] + r['compile_s']:>9.1f} "
                f"{_fmt(g('peak_memory_gib'), '.2f'):>8} {_fmt(g('xla_memory_gib'), '.2f'):>8} "
                f"{_fmt(g('xla_tflops_per_step'), '.3g'):>8} {_fmt(g('xla_vs_reference'), '.2f'):>7} "
                f"{_fmt(g('mfu') and 100 * g('mfu'), '.1f'):>6} "
                f"{_fmt(g('mfu_reference') and 100 * g('mfu_reference'), '.1f'):>6}")
        speedups = g("speedup_vs_torch_by_variant") or {}
        line += "".join(f" {_fmt(speedups.get(v), '.2f'):>8}" for v in columns)
        print(line)


def cost_model_report(args) -> dict:
    """--cost-model-only: the cost model of every configuration of the grid, written to --out and printed
    as a table last; needs no device. Each row: forward GFLOP per image (the DPT's by part, `resize`
    apart from the model FLOPs), image forward passes per step, TFLOP per step."""
    rows = []
    for config, _ in configurations(args):
        gflops, tflops = forward_gflops(config, args.num_classes), reference_tflops(config, args.num_classes)
        row = {"method": config.method.name, **model_keys(config), "crop": config.data.crop_size,
               "labeled": config.batch.labeled,
               "unlabeled": 0 if config.method.name == "supervised" else config.batch.unlabeled,
               "forward_gflops": gflops, "passes": None if tflops is None else tflops * 1e3 / gflops,
               "reference_tflops_per_step": tflops}
        if config.model.get("name") == "dpt":
            parts = dpt_forward_flops(build_model(config.model, args.num_classes), config.data.crop_size,
                                      config.data.crop_size)
            row["forward_gflops_by_part"] = {k: v / 1e9 for k, v in parts.items()}
        rows.append(row)
    report = {"cost_model_only": True, "tiny": args.tiny, "num_classes": args.num_classes, "out": args.out,
              "results": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"cost model, {args.num_classes} classes: GFLOP of one image's forward (2 per multiply-add; the DPT's "
          f"model FLOPs count every kernel tap, csl_jax's resize matmuls apart), TFLOP per step; in {args.out}")
    parts = ("patch_embed", "linear", "attention", "head", "resize")
    print(f"{'method':>11} {'model':>5} {'OS':>3} {'crop':>5} {'batch':>6} "
          + " ".join(f"{p:>11}" for p in parts) + f" {'forward':>9} {'passes':>6} {'TFLOP/step':>10}")
    for r in rows:
        by_part, batch = r.get("forward_gflops_by_part", {}), f"{r['labeled']}+{r['unlabeled']}"
        print(f"{r['method']:>11} {model_label(r):>5} {r['output_stride'] or '-':>3} {r['crop']:>5} {batch:>6} "
              + " ".join(f"{_fmt(by_part.get(p), '.2f'):>11}" for p in parts)
              + f" {_fmt(r['forward_gflops'], '.2f'):>9} {_fmt(r['passes'], '.0f'):>6} "
              f"{_fmt(r['reference_tflops_per_step'], '.2f'):>10}")
    return report


def flag_name(flag: str) -> str:
    """'--xla_dump_to=/x' -> '--xla_dump_to'."""
    return flag.split("=", 1)[0]


def requested_xla_flags(args) -> list[str]:
    """The XLA flags this run needs: --xla-flags, then with --profile-dir command buffers kept on while
    profiling (XLA's default switches to op-by-op launches under a profiler), then with --hlo-dump the
    HLO text dump (before and after optimisation, buffer assignment) into that directory."""
    flags = shlex.split(args.xla_flags)
    if args.profile_dir:
        flags.append(PROFILING_FLAG + "=true")
    if args.hlo_dump:
        flags += [f"--xla_dump_to={args.hlo_dump}", "--xla_dump_hlo_as_text"]
    return flags


def merge_xla_flags(existing: str, wanted: list[str]) -> tuple[str, list[str]]:
    """(XLA_FLAGS with `wanted` appended, the flags appended): a flag whose name `existing` already sets
    is left out (what the caller exported wins), and so is a repeated one."""
    present = {flag_name(f) for f in shlex.split(existing)}
    added = []
    for flag in wanted:
        if flag_name(flag) not in present:
            added.append(flag)
            present.add(flag_name(flag))
    return " ".join(filter(None, [existing.strip(), *added])), added


def xla_flag_value(flags: str, name: str) -> str | None:
    """The value of flag `name` ('--xla_...') in an XLA_FLAGS string (the last one wins); None if unset."""
    values = [f.partition("=")[2] for f in shlex.split(flags) if flag_name(f) == name]
    return values[-1] if values else None


def configure_xla_flags(args) -> dict:
    """Puts `requested_xla_flags(args)` into XLA_FLAGS, which XLA reads once, when JAX initialises its
    backend: so this runs first in `main`, and exits with a message (no measurement with flags that
    would silently not apply) when this process has initialised the backend already and a flag is missing.

    Returns the report's record: the XLA_FLAGS in effect, the flags added, and whether command buffers
    stay on while profiling ('true' / 'false' as set; None: XLA's default, false)."""
    from jax._src import xla_bridge

    merged, added = merge_xla_flags(os.environ.get("XLA_FLAGS", ""), requested_xla_flags(args))
    if added:
        if xla_bridge.backends_are_initialized():
            raise SystemExit(f"benchmarks.train_step: XLA flags {' '.join(added)} must be in XLA_FLAGS before JAX "
                             f"initialises its backend, and this process has initialised it already: run the "
                             f"benchmark in a fresh process, or export XLA_FLAGS='{merged}' first")
        os.environ["XLA_FLAGS"] = merged
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_flags_added": added,
            "command_buffers_during_profiling": xla_flag_value(os.environ.get("XLA_FLAGS", ""), PROFILING_FLAG)}


def compare_reports(named: list[str]) -> dict:
    """--compare LABEL=REPORT.json ...: one row per (label, timed result) with the flags it ran with,
    compile_s (lower + compile), ms_per_step, ms_per_step_synced, dispatch_ms, peak memory; a report
    that is missing or unreadable (the run failed or was stopped) gives one row with its status. Used
    by `benchmarks/gpu_suite.sh runB` (one process per XLA flag variant)."""
    rows = []
    for item in named:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--compare takes LABEL=REPORT.json, got {item!r}")
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            rows.append({"label": label, "status": f"no report ({type(e).__name__})", "file": path})
            continue
        for r in report["results"]:
            rows.append({"label": label, "status": "ok", "file": path, "xla_flags": report.get("xla_flags", ""),
                         "xla_flags_added": report.get("xla_flags_added", []), "method": r["method"],
                         "compile_s": r["lower_s"] + r["compile_s"], "ms_per_step": r.get("ms_per_step"),
                         "ms_per_step_synced": r.get("ms_per_step_synced"), "dispatch_ms": r.get("dispatch_ms"),
                         "peak_memory_gib": r.get("peak_memory_gib")})
    return {"compare": True, "rows": rows}


def format_comparison(comparison: dict) -> str:
    """The --compare rows as a Markdown table."""
    lines = ["| variant | method | compile s | ms/step | ms/step synced | dispatch ms | peak GiB | flags added |",
             "|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['method']} | {r['compile_s']:.1f} | {_fmt(r['ms_per_step'], '.1f')} | "
                     f"{_fmt(r['ms_per_step_synced'], '.1f')} | {_fmt(r['dispatch_ms'], '.2f')} | "
                     f"{_fmt(r['peak_memory_gib'], '.2f')} | {' '.join(r['xla_flags_added']) or '-'} |")
    return "\n".join(lines)


def enable_compilation_cache(directory: str) -> None:
    """Persistent XLA compilation cache in `directory`, caching every program (no size/time floor)."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring); --tiny overrides the grid."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", choices=sorted(METHOD_CONFIGS) + sorted(V2_METHODS),
                        help="default: csl (--tiny: supervised unimatch csl); unimatch_v2, fixmatch_v2 and "
                             "supervised_v2 train the DINOv2 + DPT")
    parser.add_argument("--depth", type=int, nargs="+", default=[101], choices=[50, 101])
    parser.add_argument("--output-stride", type=int, nargs="+", default=[16], choices=[8, 16])
    parser.add_argument("--encoder", nargs="+", default=["small"], choices=list(ENCODER_LABELS),
                        help="DINOv2 size of the V2 methods' DPT (--tiny: common.TINY_DPT)")
    parser.add_argument("--crop", type=int, nargs="+",
                        help="default: 513 (--tiny: 33); 518 (--tiny: 28) for the DPT, which needs multiples of 14")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                        help="default: bfloat16 (--tiny: float32)")
    parser.add_argument("--labeled", type=int, default=8, help="global labeled batch")
    parser.add_argument("--unlabeled", type=int, default=8, help="global unlabeled batch (and mix batch)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--remat", action="store_true", help="config.model.remat: rematerialise each block")
    parser.add_argument("--kernels", nargs="+", choices=layers.KERNELS, default=["fast"],
                        help="csl_jax.models.layers.kernels: 'fast' (fused BatchNorm, GEMM weight gradients of the "
                             "dilated convs, bf16 logit resize) and/or 'reference' (the plain JAX formulations)")
    parser.add_argument("--num-devices", type=int, default=0,
                        help="first N devices (default: all; the targets are for --num-devices 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", "--peak_tflops", type=float, default=0.0,
                        help="device peak for MFU, TFLOP/s (default: measure a large bf16 matmul)")
    parser.add_argument("--torch", action="store_true", help="also run benchmarks/torch_reference.py")
    parser.add_argument("--compilation-cache", default="",
                        help="persistent XLA compilation cache directory (default: none); a second process "
                             "with the same directory measures the warm compile time")
    parser.add_argument("--compile-only", action="store_true",
                        help="lower and compile each configuration, do not run it (compile-time measurements)")
    parser.add_argument("--profile-dir", default="",
                        help="trace --profile-steps extra steps of each configuration with jax.profiler there")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--hlo-dump", default="",
                        help="dump the HLO of every compiled program as text there (XLA's --xla_dump_to; before and "
                             "after optimisation, buffer assignment): see benchmarks/hlo_stats.py")
    parser.add_argument("--xla-flags", default="",
                        help="more XLA flags for this process, e.g. --xla-flags=--xla_gpu_autotune_level=1 (appended "
                             "to XLA_FLAGS before JAX initialises; a flag XLA_FLAGS already sets keeps its value)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="with --torch: also torch.compile rows (torch_reference --compile)")
    parser.add_argument("--torch-compile-mode", default="default", help="with --torch-compile: torch.compile mode")
    parser.add_argument("--torch-strict-fp32", action="store_true",
                        help="with --torch: also float32 rows with TF32 off (torch_reference --strict-fp32)")
    parser.add_argument("--torch-args", default="", help="more torch_reference arguments (one string)")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=REPORT",
                        help="no run: tabulate compile s, ms/step (back to back, synced) and dispatch ms of earlier "
                             "reports (one per XLA flag variant) into --out")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny model, R50 OS8 float32, batch 2+2, one device, 1+2 iterations")
    parser.add_argument("--cost-model-only", action="store_true",
                        help="print the cost model of the grid (forward GFLOP per image, TFLOP per step) and stop: "
                             "no device, no compilation")
    parser.add_argument("--out", default="train_step.json", help="JSON results file")
    args = parser.parse_args(argv)
    for name in ("labeled", "unlabeled", "warmup", "iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.tiny:
        args.method = args.method or ["supervised", "unimatch", "csl"]
        args.depth, args.output_stride, args.labeled, args.unlabeled = [50], [8], 2, 2
        args.dtype = args.dtype or ["float32"]
        args.num_devices, args.warmup, args.iters = 1, 1, 2
    args.dtype = args.dtype or ["bfloat16"]
    args.method = args.method or ["csl"]
    if any(m in V2_METHODS for m in args.method) and any(c % 14 for c in args.crop or ()):
        parser.error(f"the DPT of {sorted(V2_METHODS)} takes crops that are multiples of 14, got --crop {args.crop}")
    return args


def main(argv=None) -> dict:
    """Runs the benchmark grid; returns the report written to --out."""
    args = parse_args(argv)
    if args.compare:
        comparison = compare_reports(args.compare)
        with open(args.out, "w") as f:
            json.dump(comparison, f, indent=2)
        print(format_comparison(comparison))
        return comparison
    if args.cost_model_only:
        return cost_model_report(args)
    flags = configure_xla_flags(args)  # first: XLA reads XLA_FLAGS once, when the backend starts
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    torch_report = run_torch(args) if args.torch else None  # before JAX allocates device memory
    devices = jax.devices()[:args.num_devices or None]
    device = devices[0]
    size, dtype = PEAK_MATMUL["cpu" if device.platform == "cpu" else "accelerator"]
    if args.compile_only:
        peak, source, method = None, "not measured (--compile-only)", None
    elif args.peak_tflops > 0:
        peak, source, method = args.peak_tflops, "flag", "--peak-tflops"
    else:  # in this process, before the steps: the MFU's denominator on the same device and clock
        peak, source = measure_peak_tflops(size, dtype), "measured-in-process"
        method = f"{size}^3 {jnp.dtype(dtype).name} matmul, random operands, 1 s warm-up, median of 5 chains of 20"
    results = []
    for (config, name), kernels in itertools.product(configurations(args), args.kernels):
        name = name if kernels == "fast" else f"{name}_{kernels}"
        profile_dir = args.profile_dir and os.path.join(args.profile_dir, name)
        with layers.kernels(kernels):  # read while the step is traced (in bench_one)
            result = bench_one(config, devices, args.num_classes, args.warmup, args.iters, peak, args.compile_only,
                               profile_dir, args.profile_steps)
        result["kernels"] = kernels
        print(json.dumps(result), flush=True)
        results.append(result)
    # the same matmul after the steps (a clock that drifted shows as a different figure); not used for MFU
    peak_end = measure_peak_tflops(size, dtype) if source == "measured-in-process" else None
    if torch_report is not None:
        attach_torch(results, torch_report["results"])
    report = {"device": f"{device.platform}: {device.device_kind}", "devices": len(devices),
              "jax": jax.__version__, "tiny": args.tiny, "peak_tflops": peak, "peak_source": source,
              "peak_method": method, "peak_tflops_end": peak_end,
              "compilation_cache": args.compilation_cache or None, **flags, "hlo_dump": args.hlo_dump or None,
              "dispatch_samples": DISPATCH_SAMPLES, "out": args.out, "results": results}
    if torch_report is not None:
        report.update(torch_device=torch_report["device"], torch=torch_report["torch"],
                      torch_settings=torch_report.get("settings"), torch_results=torch_report["results"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
