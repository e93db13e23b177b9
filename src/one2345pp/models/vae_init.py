"""The starting point of the VAE fit of a randomly initialised multi-view model: :func:`isometric_vae_init`.

A random ``AutoencoderKL`` re-initialised so that its encoder and decoder start as near-isometric linear maps (see
:func:`isometric_vae_init` for why); the fit itself is :mod:`one2345pp.models.vae_fit`.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

__all__ = ["BALANCE_BETA", "BALANCE_OFFSET", "FIT_INIT_LOGVAR", "isometric_vae_init"]

# Log-variance the posterior starts from in the VAE fit: a posterior std of e^-5, well below the latent spread. The
# default head gives log-variance ~0 (std ~1) against posterior means of std ~0.3, so the decoder would be trained
# on latents that are mostly noise.
FIT_INIT_LOGVAR = -10.0
# The decoder's output GroupNorm at the fit's start: a constant +-BALANCE_OFFSET channel pair in every group fixes
# the group statistics, and the signal channels enter the SiLU at BALANCE_BETA, where it is nearly linear.
BALANCE_OFFSET, BALANCE_BETA = 10.0, 3.0


def _orthogonal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.init.orthogonal_(torch.empty(rows, cols), generator=g)


def _silu_slope(x: float) -> float:
    s = 1.0 / (1.0 + math.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def _decoder_stream_writer(decoder) -> torch.nn.Conv2d:
    """The last convolution that writes the decoder's residual stream before ``conv_norm_out`` (ResNet branches
    and attention start as identities, so nothing after it changes the stream)."""
    first = decoder.up_blocks[-1].resnets[0]
    if first.conv_shortcut is not None:
        return first.conv_shortcut
    for block in reversed(decoder.up_blocks[:-1]):
        if block.upsamplers:
            return block.upsamplers[0].conv
    return decoder.conv_in


def _balance_output_norm(decoder, g: torch.Generator) -> None:
    """Make the decoder's ``conv_out(SiLU(conv_norm_out(h)))`` a linear map of the stream at the fit's start.

    GroupNorm normalises every group of channels per image: on views of small objects on a uniform background it
    removes each group's mean and divides by a std set by the object's contrast, so the decoder cannot say how bright
    or how saturated an object is (held-out colours came out wrong after 100 steps). Here each group of ``n >= 4``
    channels holds ``(n - 2) // 2`` signals as pairs ``(s, -s)`` (zero group mean at every pixel) and one constant
    pair ``(+K, -K)`` that sets the group std to ``K * sqrt(2 / n)`` up to second order in ``s``; the norm's scale
    undoes that std, its shift moves the signals to where SiLU is nearly linear, and ``conv_out`` reads each pair's
    difference. Training may leave this arrangement; it only sets where the fit starts.
    """
    writer, norm, reader = _decoder_stream_writer(decoder), decoder.conv_norm_out, decoder.conv_out
    channels, groups = norm.num_channels, norm.num_groups
    n = channels // groups
    if n < 4:
        raise ValueError(
            f"VAE fit: the decoder's last level has {channels} channels in {groups} norm groups; its initialisation "
            "needs >= 4 channels per group (lower the VAE's norm_num_groups)"
        )
    pairs = (n - 2) // 2
    q = _orthogonal(groups * pairs, writer.in_channels, g)  # stream -> signals
    r = _orthogonal(reader.out_channels, groups * pairs, g)  # signals -> image
    sigma, slope = BALANCE_OFFSET * math.sqrt(2.0 / n), _silu_slope(BALANCE_BETA)
    wh, ww = writer.kernel_size[0] // 2, writer.kernel_size[1] // 2
    rh, rw = reader.kernel_size[0] // 2, reader.kernel_size[1] // 2
    for m in (writer, norm, reader):
        m.weight.zero_()
        m.bias.zero_()
    for group in range(groups):
        for k in range(pairs):
            i, c = group * pairs + k, group * n + 2 * k
            writer.weight[c, :, wh, ww] = q[i]
            writer.weight[c + 1, :, wh, ww] = -q[i]
            norm.weight[c : c + 2] = sigma
            norm.bias[c : c + 2] = BALANCE_BETA
            reader.weight[:, c, rh, rw] = r[:, i] / (2.0 * slope)
            reader.weight[:, c + 1, rh, rw] = -r[:, i] / (2.0 * slope)
        writer.bias[group * n + n - 2] = BALANCE_OFFSET
        writer.bias[group * n + n - 1] = -BALANCE_OFFSET


def isometric_vae_init(vae, seed: int = 0) -> None:
    """Re-initialise a random ``AutoencoderKL`` for a fast autoencoder fit (the start of
    :func:`one2345pp.models.vae_fit.fit_vae`); draws come from ``seed`` only, the global RNG is untouched.

    From PyTorch's default init the fit sits for hundreds of steps on the data set's mean image: each layer scales
    its signal by about 1/sqrt(3), so along the ~15 convolutions of the main path (conv_in, strided / upsampling
    convolutions, shortcuts, conv_out, quant convs) the output hardly depends on the input, while the residual branches
    (GroupNorm -> SiLU -> conv) add patterns that do not depend on it either -- the plateau of a deep linear chain
    started small. Here every convolution is delta-orthogonal (an orthogonal channel map on the centre tap, zero bias),
    the last convolution of every ResNet branch and every attention output projection start at zero (the blocks are
    identities), the posterior log-variance starts at ``FIT_INIT_LOGVAR`` and the decoder's output GroupNorm is
    balanced (:func:`_balance_output_norm`).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                out_ch, in_ch, kh, kw = module.weight.shape
                module.weight.zero_()
                module.weight[:, :, kh // 2, kw // 2] = _orthogonal(out_ch, in_ch, g)
                if module.bias is not None:
                    module.bias.zero_()
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        head = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        c = head.out_channels // 2  # moments: mean channels, then log-variance channels
        head.weight[c:] = 0.0
        head.bias[c:] = FIT_INIT_LOGVAR
        _balance_output_norm(vae.decoder, g)
