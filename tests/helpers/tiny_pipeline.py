"""A tiny :class:`~one2345pp.pipeline.one2345.One2345PPPipeline` built from small configs of the real classes, for
tests of the pipeline, ``one2345pp infer`` and ``one2345pp eval --dataset`` (``tiny_pipeline_dir`` in conftest.py
saves one for the session):

* multi-view: the ``tiny`` preset of :mod:`one2345pp.models.multiview_builders` at random (seed 0), 32 px views;
* coarse (8^3) and fine (16^3, children of the coarse cells): the layout of ``experiments/tiny/{coarse,fine}.yaml``
  (small CNN condition encoders, dense 3D UNet / sparse UNet), narrower and on coarser grids so the fixture stays
  fast;
* texture: a 16^3 colour field, 20 refinement steps, a 64^2 texture.

A randomly initialised coarse model may predict an empty volume (the pipeline then raises RuntimeError), so the
3D stages get a few deterministic Adam steps of their own diffusion loss (``CoarseModel.loss`` / ``FineModel.loss``)
on one synthetic object: the occupancy shell and the SDF of a sphere of radius 0.3, conditioned on random views
(uniform noise images, the six cameras of the layout). A diffusion model trained on a single object whatever the
condition learns that object as its distribution, so sampling from any image gives the sphere's shell (IoU about
0.98 with the target after 30 steps) and a closed mesh around radius 0.3. Measured on the shared 2-core machine
(load 4-6): building 3.5-7.5 s (the two fits; the rest well under a second), one pipeline call with the stored
settings (4 multi-view steps, 8 coarse and 4 fine steps, 20 refinement steps) 0.4-3.5 s.
"""

from __future__ import annotations

TINY_VIEW = 32  # pixels per generated view and of the 3D stages' condition image
TINY_COARSE = 8  # coarse grid side; the fine grid is twice that
SPHERE_RADIUS = 0.3
FINE_TRUNCATION = 0.1  # normalised units: 1.6 fine voxels at 16^3


def tiny_coarse_config(resolution: int = TINY_COARSE) -> dict:
    return {
        "unet": {
            "resolution": resolution,
            "base_channels": 8,
            "channel_mults": [1, 2, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [],
            "head_channels": 8,
        },
        "condition": {
            "image_features": {"kind": "cnn", "cnn_channels": [8, 8]},
            "mlp_hidden": 8,
            "feature_channels": 8,
            "level_channels": [4, 4, 8],
        },
        "global_embedding": {"kind": "cnn", "cnn_channels": [8, 8], "cnn_dim": 8},
        "diffusion": {"sample_steps": 8, "guidance_scale": 1.0},
    }


def tiny_fine_config(resolution: int = 2 * TINY_COARSE) -> dict:
    return {
        "unet": {"resolution": resolution, "base_channels": 8, "channel_mults": [1, 2], "backend": "torch"},
        "condition": {
            "image_features": {"kind": "cnn", "cnn_channels": [8, 8]},
            "mlp_hidden": 8,
            "feature_channels": 8,
            "level_channels": [4, 8],
        },
        "global_embedding": {"kind": "cnn", "cnn_channels": [8, 8], "cnn_dim": 8},
        "diffusion": {"sample_steps": 4, "guidance_scale": 1.0},
        "coarse_factor": 2,
        "sdf_truncation": FINE_TRUNCATION,
    }


def sphere_targets(coarse_resolution: int, radius: float = SPHERE_RADIUS):
    """The sphere's occupancy shell ``[1, 1, C, C, C]`` in {-1, +1} (|SDF| under one coarse voxel), its fine support
    ``[N, 4]`` and the fine x0 ``[N, 4]`` (SDF / truncation clipped to [-1, 1], a constant colour)."""
    import torch

    from one2345pp.models.condition_volume import grid_centres
    from one2345pp.models.fine import cell_centres, support_from_occupancy

    c = coarse_resolution
    p = grid_centres(c).reshape(c, c, c, 3)
    occ = torch.where((p.norm(dim=-1) - radius).abs() < 1.0 / c, 1.0, -1.0)[None, None]
    support = support_from_occupancy(occ, 2)
    points = cell_centres(support, 2 * c)
    sdf = ((points.norm(dim=-1, keepdim=True) - radius) / FINE_TRUNCATION).clamp(-1, 1)
    rgb = torch.tensor([[0.6, -0.2, -0.6]]).expand(len(points), 3)
    return occ, support, torch.cat([sdf, rgb], dim=1)


def fit_on_random_views(model, loss_fn, steps: int, seed: int, lr: float = 3e-3) -> float:
    """``steps`` Adam steps of ``loss_fn(views, c2w, K, cond_image)`` with uniform-noise views and input images (the
    six cameras of the default layout at 32 px); the model is left in eval mode. Returns the last loss."""
    import torch

    from one2345pp.cameras import framing_distance, get_layout, multiview_cameras
    from one2345pp.models.condition_volume import camera_tensors

    layout = get_layout("zero123pp-v1.2")
    c2w, k = camera_tensors(multiview_cameras(0.0, layout.name, framing_distance(layout.fov_deg, 0.9), TINY_VIEW))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        views = torch.rand((1, 6, 3, TINY_VIEW, TINY_VIEW), generator=gen)
        cond = torch.rand((1, 3, TINY_VIEW, TINY_VIEW), generator=gen)
        loss = loss_fn(views, c2w, k, cond, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def tiny_coarse_model(steps: int = 30, seed: int = 0):
    """A tiny coarse model fitted to the sphere's shell (see the module doc)."""
    import torch

    from one2345pp.models.coarse import CoarseModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CoarseModel(tiny_coarse_config())
    occ, _, _ = sphere_targets(model.resolution)

    def loss(views, c2w, k, cond, gen):
        return model.loss(occ, model.encode(views, c2w, k, cond), generator=gen)[0]

    fit_on_random_views(model, loss, steps, seed)
    return model


def tiny_fine_model(steps: int = 15, seed: int = 0):
    """A tiny fine model fitted to the sphere's SDF on its shell (see the module doc)."""
    import torch

    from one2345pp.models.fine import FineModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FineModel(tiny_fine_config())
    _, support, x0 = sphere_targets(model.coarse_resolution)

    def loss(views, c2w, k, cond, gen):
        return model.loss(x0, model.encode(views, c2w, k, cond, support, 1), generator=gen)[0]

    fit_on_random_views(model, loss, steps, seed + 1)
    return model


def tiny_multiview(seed: int = 0, view_size: int = TINY_VIEW):
    """The tiny preset's multi-view pipeline at random (``seed``), ``view_size`` px views."""
    from one2345pp.models.multiview_builders import random_components

    pipe = random_components("tiny", seed).pipeline(view_size, view_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_texture_settings():
    from one2345pp.models.color_field import ColorFieldConfig
    from one2345pp.texture.bake import BakeConfig
    from one2345pp.texture.refine import RefineConfig
    from one2345pp.texture.settings import TextureSettings

    return TextureSettings(
        field=ColorFieldConfig(resolution=16, components=2, feature_dim=8, hidden=16, layers=1),
        refine=RefineConfig(iterations=20, batch_pixels=1024, progress=False),
        bake=BakeConfig(texture_size=64, padding=2, dilation=4),
    )


def tiny_settings():
    from one2345pp.pipeline.one2345 import PipelineSettings
    from one2345pp.pipeline.preprocess import PreprocessConfig

    return PipelineSettings(
        view_size=TINY_VIEW,
        num_inference_steps=4,
        coarse_steps=8,
        fine_steps=4,
        preprocess=PreprocessConfig(size=TINY_VIEW),
    )


def tiny_pipeline():
    """The pipeline object the fixture saves (built from scratch, a few seconds)."""
    from one2345pp.pipeline.one2345 import One2345PPPipeline

    return One2345PPPipeline(
        tiny_multiview(), tiny_coarse_model(), tiny_fine_model(), tiny_texture_settings(), tiny_settings()
    )
