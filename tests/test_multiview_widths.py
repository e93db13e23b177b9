"""``model.unet_channels`` / ``model.latent_channels``: the widths of a randomly initialised multi-view UNet and the
latent channels of its VAE, kept through export and reload."""

from __future__ import annotations

import pytest
import torch

from one2345pp.models.multiview_builders import PRESETS, MultiViewModelConfig, build_components
from one2345pp.models.multiview_pipeline import MultiViewDiffusionPipeline


def test_preset_widths_by_default():
    c = build_components(MultiViewModelConfig())
    assert tuple(c.unet.config.block_out_channels) == tuple(PRESETS["tiny"]["unet"]["block_out_channels"])


def test_wider_unet_round_trips(tmp_path):
    c = build_components(MultiViewModelConfig(unet_channels=[16, 48, 64], condition_concat=True))
    assert tuple(c.unet.config.block_out_channels) == (16, 48, 64)
    assert c.unet.config.in_channels == 2 * c.vae.config.latent_channels
    c.pipeline(view_size=64, cond_size=64, condition_concat=True).save_pretrained(tmp_path / "export")
    loaded = MultiViewDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert tuple(loaded.unet.config.block_out_channels) == (16, 48, 64)
    for name, p in c.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], p, rtol=0, atol=0)


@pytest.mark.parametrize("channels", [[32, 64], [30, 64, 128], [0, 64, 128]])
def test_bad_widths_are_named(channels):
    with pytest.raises(ValueError, match=r"model\.unet_channels"):
        build_components(MultiViewModelConfig(unet_channels=channels))


def test_widths_refused_for_pretrained_folders(tmp_path):
    with pytest.raises(ValueError, match=r"unet_channels.*model\.pretrained"):
        build_components(MultiViewModelConfig(pretrained=str(tmp_path), unet_channels=[64, 128, 256]))


def test_latent_channels_size_vae_and_unet_and_round_trip(tmp_path):
    c = build_components(MultiViewModelConfig(latent_channels=8, condition_concat=True))
    assert c.vae.config.latent_channels == 8
    assert (c.unet.config.in_channels, c.unet.config.out_channels) == (16, 8)
    pipe = c.pipeline(view_size=64, cond_size=64, condition_concat=True)
    pipe.save_pretrained(tmp_path / "export")
    loaded = MultiViewDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert loaded.vae.config.latent_channels == 8
    cond = torch.rand(1, 3, 64, 64)
    out = loaded(cond, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").grid
    assert out.shape == (1, 3, 3 * 64, 2 * 64)


def test_default_latent_channels_are_the_presets():
    c = build_components(MultiViewModelConfig())
    assert c.vae.config.latent_channels == PRESETS["tiny"]["vae"]["latent_channels"]
    assert c.unet.config.out_channels == c.vae.config.latent_channels


def test_bad_latent_channels_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"model\.latent_channels=0"):
        build_components(MultiViewModelConfig(latent_channels=0))
    with pytest.raises(ValueError, match=r"latent_channels.*model\.pretrained"):
        build_components(MultiViewModelConfig(pretrained=str(tmp_path), latent_channels=8))
