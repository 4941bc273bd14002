"""A PyTorch transcription of UniMatch V2's DINOv2 encoder and DPT head, for parity tests.

Written from the spec, docs/methods/unimatch_v2.md §§1-3 (not copied from the official code), which
cites LiheYoung/UniMatch-V2 at commit f6afb4d:
- `model/backbone/dinov2.py` lines 179-210 (interpolate_pos_encoding), 212-231 (prepare_tokens),
  271-281 and 297-321 (get_intermediate_layers, norm=True), 341-397 (the four sizes);
- `model/backbone/dinov2_layers/`: `patch_embed.py` 66-79, `block.py` 82-107 (the drop-path-free
  branch), `attention.py` 29-62, `layer_scale.py` 16-28, `mlp.py` 17-41, `swiglu_ffn.py` 13-63;
- `model/semseg/dpt.py` lines 10-19 (fusion blocks), 33-83 (DPTHead), 85-109 (its forward),
  112-170 (DPT with comp_drop's masks multiplying the four taps, output upsampling);
- `model/util/blocks.py` lines 4-26 (_make_scratch), 29-80 (ResidualConvUnit), 83-148
  (FeatureFusionBlock).

Module and parameter names follow the official state-dict keys, so that `state_dict()` has the
official layout (`mask_token` and `refinenet4.resConfUnit1` included, unused as there). Options
for tiny networks: every size, `taps`, `pos_grid` (the stored grid side, 37 officially).
"""
import math

import torch
import torch.nn as tnn
import torch.nn.functional as F


def swiglu_hidden(dim):
    """swiglu_ffn.py:57 with hidden 4D: (int(4D * 2/3) + 7) // 8 * 8."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


class Mlp(tnn.Module):
    """fc1 -> exact GELU -> fc2 (`approximate`: a wrong variant for negative checks)."""

    def __init__(self, dim, approximate="none"):
        super().__init__()
        self.fc1 = tnn.Linear(dim, 4 * dim)
        self.act = tnn.GELU(approximate=approximate)
        self.fc2 = tnn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(tnn.Module):
    """w12 -> halves x1, x2 -> silu(x1) * x2 -> w3."""

    def __init__(self, dim):
        super().__init__()
        hidden = swiglu_hidden(dim)
        self.w12 = tnn.Linear(dim, 2 * hidden)
        self.w3 = tnn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(tnn.Module):
    """qkv (bias) -> (B, N, 3, heads, hd): q, k, v; softmax(q * hd^-0.5 @ k^T) @ v; proj (bias)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = tnn.Linear(dim, 3 * dim)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class LayerScale(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = tnn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(tnn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x))); `eps` / `approximate`: wrong variants."""

    def __init__(self, dim, num_heads, ffn="mlp", eps=1e-6, approximate="none"):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = tnn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, approximate) if ffn == "mlp" else SwiGLU(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(tnn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = tnn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major


def interpolate_grid(grid, h, w):
    """(1, D, M, M) -> (1, D, h, w): bicubic by scale factors ((h + 0.1) / M, (w + 0.1) / M) (spec §1.3)."""
    m = grid.shape[-1]
    out = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
    assert out.shape[-2:] == (h, w)
    return out


class DinoVisionTransformer(tnn.Module):
    def __init__(self, dim, depth, num_heads, ffn="mlp", patch=14, pos_grid=37):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, 1 + pos_grid ** 2, dim))
        self.mask_token = tnn.Parameter(torch.zeros(1, dim))
        self.blocks = tnn.ModuleList([Block(dim, num_heads, ffn) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)

    def positions(self, npatch, height, width):
        n = self.pos_embed.shape[1] - 1
        if npatch == n and height == width:
            return self.pos_embed
        m, d = math.isqrt(n), self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].float().reshape(1, m, m, d).permute(0, 3, 1, 2)
        grid = interpolate_grid(grid, height // self.patch, width // self.patch)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)

    def get_intermediate_layers(self, x, taps):
        height, width = x.shape[-2:]
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.positions(t.shape[1] - 1, height, width)
        outputs = []
        for i, block in enumerate(self.blocks):
            t = block(t)
            if i in taps:
                outputs.append(t)
        return [self.norm(o)[:, 1:] for o in outputs]


class ResidualConvUnit(tnn.Module):
    def __init__(self, features):
        super().__init__()
        self.conv1 = tnn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.conv2 = tnn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.activation = tnn.ReLU(False)

    def forward(self, x):
        return self.conv2(self.activation(self.conv1(self.activation(x)))) + x


class FeatureFusionBlock(tnn.Module):
    def __init__(self, features):
        super().__init__()
        self.out_conv = tnn.Conv2d(features, features, 1, 1, 0, bias=True)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, *xs, size=None):
        out = xs[0]
        if len(xs) == 2:
            out = out + self.resConfUnit1(xs[1])
        out = self.resConfUnit2(out)
        resize = {"scale_factor": 2} if size is None else {"size": size}
        return self.out_conv(F.interpolate(out, **resize, mode="bilinear", align_corners=True))


class DPTHead(tnn.Module):
    def __init__(self, nclass, dim, features, out_channels):
        super().__init__()
        c = out_channels
        self.projects = tnn.ModuleList([tnn.Conv2d(dim, oc, 1) for oc in c])
        self.resize_layers = tnn.ModuleList([tnn.ConvTranspose2d(c[0], c[0], 4, 4, 0),
                                             tnn.ConvTranspose2d(c[1], c[1], 2, 2, 0), tnn.Identity(),
                                             tnn.Conv2d(c[3], c[3], 3, 2, 1)])
        self.scratch = tnn.Module()
        for k, oc in enumerate(c, 1):
            setattr(self.scratch, f"layer{k}_rn", tnn.Conv2d(oc, features, 3, 1, 1, bias=False))
        for k in range(1, 5):
            setattr(self.scratch, f"refinenet{k}", FeatureFusionBlock(features))
        self.scratch.output_conv = tnn.Sequential(tnn.Conv2d(features, features, 3, 1, 1), tnn.ReLU(True),
                                                  tnn.Conv2d(features, nclass, 1, 1, 0))
        self.intermediates = {}

    def forward(self, features, h, w):
        layers = []
        for k, x in enumerate(features):
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], h, w)
            layers.append(self.resize_layers[k](self.projects[k](x)))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{k}_rn")(x) for k, x in enumerate(layers, 1))
        p4 = s.refinenet4(l4, size=l3.shape[2:])
        p3 = s.refinenet3(p4, l3, size=l2.shape[2:])
        p2 = s.refinenet2(p3, l2, size=l1.shape[2:])
        p1 = s.refinenet1(p2, l1)
        self.intermediates = {"p4": p4, "p3": p3, "p2": p2, "p1": p1}
        return s.output_conv(p1)


class DPT(tnn.Module):
    """DINOv2 `backbone` + DPT `head`; `forward(x, feature_scale)` with the (B, D) masks of comp_drop
    (given here instead of drawn) multiplying the four taps; logits at the input size."""

    def __init__(self, nclass, dim, depth, num_heads, taps, features, out_channels, ffn="mlp", pos_grid=37):
        super().__init__()
        self.taps = tuple(taps)
        self.backbone = DinoVisionTransformer(dim, depth, num_heads, ffn, pos_grid=pos_grid)
        self.head = DPTHead(nclass, dim, features, out_channels)
        self.features = []

    def forward(self, x, feature_scale=None):
        h, w = x.shape[-2] // 14, x.shape[-1] // 14
        features = self.backbone.get_intermediate_layers(x, self.taps)
        self.features = features
        if feature_scale is not None:
            features = [f * feature_scale.unsqueeze(1) for f in features]
        out = self.head(features, h, w)
        return F.interpolate(out, (h * 14, w * 14), mode="bilinear", align_corners=True)


def randomise(model, gen):
    """Random LayerNorm affines, LayerScales, class token and position table (in place): the official
    init leaves them at 1 / 0 / ~0, where a wrong layout would go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(("norm1.bias", "norm2.bias", "norm.bias", "cls_token", "pos_embed", "mask_token")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
