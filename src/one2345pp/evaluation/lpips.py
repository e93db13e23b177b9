"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG variant,
written in plain torch (no torchvision, no lpips package).

Computation for two images ``x``, ``y`` in [0, 1] ``[B, 3, H, W]``:

1. mapped to [-1, 1], then shifted and scaled per channel as in the paper's code:
   ``(v - shift) / scale`` with shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450);
2. the 13 conv layers of VGG16 (3x3, padding 1, ReLU; 2x2 max-pool between blocks) give the activations after
   relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (64, 128, 256, 512, 512 channels);
3. each activation is normalised to unit length over channels at every pixel (``f / (||f|| + 1e-10)``);
4. per layer: the squared difference of the two normalised activations, weighted per channel by a non-negative 1x1
   linear layer (no bias), averaged over space; the five layer values are summed -> one distance per image.

Weights file (safetensors, float32), keys:

- ``vgg.conv{b}_{i}.weight`` ``[C_out, C_in, 3, 3]`` and ``vgg.conv{b}_{i}.bias`` ``[C_out]`` for conv1_1, conv1_2,
  conv2_1, conv2_2, conv3_1..conv3_3, conv4_1..conv4_3, conv5_1..conv5_3 (the ImageNet VGG16 trunk);
- ``lin.relu1_2.weight`` ``[1, 64, 1, 1]``, ``lin.relu2_2.weight`` ``[1, 128, 1, 1]``, ``lin.relu3_3.weight``
  ``[1, 256, 1, 1]``, ``lin.relu4_3.weight`` ``[1, 512, 1, 1]``, ``lin.relu5_3.weight`` ``[1, 512, 1, 1]``
  (the learned LPIPS v0.1 weights, all >= 0).

Making the file from the official weights (both are plain state dicts, read with ``torch.load(weights_only=True)``):

- the ImageNet VGG16 of torchvision, ``vgg16-397923af.pth`` (https://download.pytorch.org/models/vgg16-397923af.pth),
  keys ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`` (the classifier is ignored); the VGG part of
  a full LPIPS model state dict (``net.slice{1..5}.{index}.{weight,bias}``) is accepted too;
- the LPIPS v0.1 linear layers, ``lpips/weights/v0.1/vgg.pth`` of https://github.com/richzhang/PerceptualSimilarity
  (also inside the ``lpips`` pip package), keys ``lin{0..4}.model.1.weight`` (or ``lin{k}.model.weight``).

Then either run ``python -m one2345pp.evaluation.lpips --vgg vgg16-397923af.pth --lin vgg.pth
--out lpips_vgg16.safetensors`` or call, in Python, :func:`convert_official` ``(vgg_state, lin_state, out)`` with
the two loaded state dicts.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..utils.atomic import atomic_file
from .appearance import as_float_images

__all__ = [
    "CONV_NAMES",
    "LAYERS",
    "LPIPS",
    "convert_official",
    "load_lpips",
    "lpips_distance",
    "main",
    "save_weights",
    "weight_shapes",
]

# (block, convs per block, channels); the feature tap is the last ReLU of each block
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
CONV_NAMES = tuple(f"conv{b}_{i}" for b, n, _ in _BLOCKS for i in range(1, n + 1))
LAYERS = tuple(f"relu{b}_{n}" for b, n, _ in _BLOCKS)
_CHANNELS = dict(zip(LAYERS, (c for *_, c in _BLOCKS), strict=True))
# index of each conv in torchvision's ``vgg16().features`` (ReLU after each conv, max-pool after each block)
TORCHVISION_INDEX = dict(zip(CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), strict=True))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
MIN_SIZE = 16  # four 2x2 poolings before relu5_3
FORMAT = "one2345pp-lpips-vgg16-v0.1"


class LPIPS(nn.Module):
    """LPIPS-VGG distance (see the module doc). A fresh instance has random weights (torch's default conv init, the
    linear weights uniform in [0, 1 / C)); :func:`load_lpips` reads the real ones. Parameters are frozen; gradients
    still flow to the inputs."""

    def __init__(self):
        super().__init__()
        convs, c_in = {}, 3
        for b, n, c in _BLOCKS:
            for i in range(1, n + 1):
                convs[f"conv{b}_{i}"] = nn.Conv2d(c_in, c, 3, padding=1)
                c_in = c
        self.vgg = nn.ModuleDict(convs)
        self.lin = nn.ModuleDict({layer: nn.Conv2d(c, 1, 1, bias=False) for layer, c in _CHANNELS.items()})
        with torch.no_grad():
            for layer, c in _CHANNELS.items():
                self.lin[layer].weight.uniform_(0.0, 1.0 / c)
        self.register_buffer("shift", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.empty(1, 3, 1, 1), persistent=False)
        self._set_constants()
        self.requires_grad_(False)
        self.eval()

    def _set_constants(self) -> None:
        device = self.vgg["conv1_1"].weight.device
        self.shift = torch.tensor(SHIFT, device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor(SCALE, device=device).view(1, 3, 1, 1)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised activations at the five taps for images in [0, 1] ``[B, 3, H, W]``."""
        x = ((images * 2.0 - 1.0) - self.shift) / self.scale
        taps = []
        for b, n, _ in _BLOCKS:
            if b > 1:
                x = F.max_pool2d(x, 2, 2)
            for i in range(1, n + 1):
                x = F.relu(self.vgg[f"conv{b}_{i}"](x))
            taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS))
        return taps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distances ``[B]`` between images in [0, 1] ``[B, 3, H, W]`` (or ``[3, H, W]`` -> a scalar tensor)."""
        single = pred.dim() == 3
        if single:
            pred, target = pred[None], target[None]
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two [B, 3, H, W] batches of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if min(pred.shape[-2:]) < MIN_SIZE:
            raise ValueError(
                f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {tuple(pred.shape[-2:])}"
            )
        dtype = self.shift.dtype
        fp, ft = self.features(pred.to(dtype)), self.features(target.to(dtype))
        total = 0.0
        for layer, a, b in zip(LAYERS, fp, ft, strict=True):
            total = total + self.lin[layer]((a - b) ** 2).mean(dim=(2, 3))
        out = total.view(-1)
        return out[0] if single else out


# ----------------------------------------------------------------------------------------------------- file I/O
def _missing_message(path: Path) -> str:
    return (
        f"LPIPS weights not found: {path}. Make the file from the official VGG16 and LPIPS v0.1 weights with "
        "`python -m one2345pp.evaluation.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out "
        f"{path}` (see one2345pp/evaluation/lpips.py) and set the LPIPS weights path in the config."
    )


def load_lpips(path: str | os.PathLike, device: str | torch.device = "cpu") -> LPIPS:
    """The model with the weights of a safetensors file in the layout of the module doc; a missing file, a file that
    is not safetensors, missing / unexpected keys, wrong shapes or negative linear weights are errors naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_message(path))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    _check_state(state, str(path))
    with torch.device("meta"):  # no random initialisation: every parameter comes from the file
        model = LPIPS()
    model.load_state_dict(state, strict=True, assign=True)
    model._set_constants()
    model.requires_grad_(False)
    return model.to(device)


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weights file with its shape (the layout of the module doc)."""
    shapes, c_in = {}, 3
    for b, n, c in _BLOCKS:
        for i in range(1, n + 1):
            shapes[f"vgg.conv{b}_{i}.weight"], shapes[f"vgg.conv{b}_{i}.bias"] = (c, c_in, 3, 3), (c,)
            c_in = c
    shapes.update({f"lin.{layer}.weight": (1, c, 1, 1) for layer, c in _CHANNELS.items()})
    return shapes


def _check_state(state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = weight_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: LPIPS weights keys do not match; missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
        if not torch.isfinite(state[key]).all():
            raise ValueError(f"{source}: {key} contains non-finite values")
    for layer in LAYERS:
        if (state[f"lin.{layer}.weight"] < 0).any():
            raise ValueError(f"{source}: lin.{layer}.weight has negative entries (LPIPS linear weights are >= 0)")


def save_weights(model: LPIPS, path: str | os.PathLike) -> Path:
    """Write the model's weights as safetensors (atomically) in the layout of the module doc."""
    return _save_state(model.state_dict(), path)


def _save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata={"format": FORMAT})
    return path


# ------------------------------------------------------------------------------------------------ conversion
def _vgg_tensor(vgg_state: Mapping[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    index = TORCHVISION_INDEX[name]
    key = f"features.{index}.{kind}"
    if key in vgg_state:
        return vgg_state[key]
    pattern = re.compile(rf"^(?:.*\.)?slice[1-5]\.{index}\.{kind}$")  # a full LPIPS model: net.sliceK.index.*
    hits = [k for k in vgg_state if pattern.match(k)]
    if len(hits) == 1:
        return vgg_state[hits[0]]
    raise ValueError(f"VGG16 state dict has no {key!r} (nor an LPIPS 'net.slice*.{index}.{kind}') for {name}")


def _lin_tensor(lin_state: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
    for key in (f"lin{k}.model.1.weight", f"lin{k}.model.weight"):
        if key in lin_state:
            return lin_state[key]
    raise ValueError(f"LPIPS state dict has no 'lin{k}.model.1.weight' (nor 'lin{k}.model.weight')")


def convert_official(
    vgg_state: Mapping[str, torch.Tensor], lin_state: Mapping[str, torch.Tensor], out: str | os.PathLike
) -> Path:
    """Write our safetensors file from torchvision's VGG16 state dict and the LPIPS v0.1 linear-layer state dict
    (both loaded with ``torch.load(..., weights_only=True)``; see the module doc for the accepted keys)."""
    state = {}
    for name in CONV_NAMES:
        state[f"vgg.{name}.weight"] = _vgg_tensor(vgg_state, name, "weight")
        state[f"vgg.{name}.bias"] = _vgg_tensor(vgg_state, name, "bias")
    for k, layer in enumerate(LAYERS):
        state[f"lin.{layer}.weight"] = _lin_tensor(lin_state, k)
    state = {k: torch.as_tensor(v).detach().to("cpu", torch.float32) for k, v in state.items()}
    _check_state(state, "converted weights")
    return _save_state(state, out)


# ------------------------------------------------------------------------------------------------ convenience
def lpips_distance(model: LPIPS, pred, target, batch_size: int = 8) -> float:
    """Mean LPIPS over images ``[N, H, W, 3]`` / ``[H, W, 3]`` (uint8 or float in [0, 1]), e.g. the six generated
    views against their ground-truth renderings."""
    p, t = as_float_images(pred, "pred"), as_float_images(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    if p.ndim == 3:
        p, t = p[None], t[None]
    if p.ndim != 4 or p.shape[-1] != 3:
        raise ValueError(f"LPIPS needs RGB images [N, H, W, 3], got {p.shape}")
    device = model.shift.device
    values = []
    with torch.inference_mode():
        for i in range(0, len(p), batch_size):
            a = torch.from_numpy(np.ascontiguousarray(p[i : i + batch_size])).permute(0, 3, 1, 2).float()
            b = torch.from_numpy(np.ascontiguousarray(t[i : i + batch_size])).permute(0, 3, 1, 2).float()
            values.append(model(a.to(device), b.to(device)).cpu())
    return float(torch.cat(values).mean())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m one2345pp.evaluation.lpips --vgg VGG16.pth --lin LPIPS_VGG.pth --out FILE.safetensors``"""
    parser = argparse.ArgumentParser(
        prog="python -m one2345pp.evaluation.lpips",
        description="Convert the official VGG16 (torchvision) and LPIPS v0.1 linear weights into one safetensors file.",
    )
    parser.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (vgg16-397923af.pth)")
    parser.add_argument("--lin", required=True, help="LPIPS v0.1 linear weights (lpips/weights/v0.1/vgg.pth)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    states = []
    for flag, value in (("--vgg", args.vgg), ("--lin", args.lin)):
        if not Path(value).is_file():
            parser.error(f"{flag}: file not found: {value}")
        states.append(torch.load(value, map_location="cpu", weights_only=True))
    out = convert_official(states[0], states[1], args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
