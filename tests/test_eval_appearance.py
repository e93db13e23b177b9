"""Appearance metrics: PSNR and mask IoU against independent computations, the 24 evaluation cameras, CLIP similarity
through a tiny randomly initialised CLIP saved to disk, and LPIPS (properties, converter round trip against a
functional reference written from torchvision's VGG16 layer order)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio

from one2345pp.cameras import framing_distance
from one2345pp.evaluation.appearance import (
    ClipConfig,
    EvalViewsConfig,
    clip_similarity,
    eval_views,
    load_clip,
    mask_iou,
    psnr,
)
from one2345pp.evaluation.lpips import LPIPS, convert_official, load_lpips, lpips_distance, main

# ------------------------------------------------------------------------------------------------------------ PSNR


def test_psnr_matches_skimage_and_averages_a_batch():
    rng = np.random.default_rng(0)
    target = rng.random((3, 16, 20, 3))
    pred = np.clip(target + rng.normal(0, [[[[0.02]]], [[[0.05]]], [[[0.1]]]], target.shape), 0, 1)
    ref = [peak_signal_noise_ratio(t, p, data_range=1.0) for t, p in zip(target, pred)]
    assert psnr(pred[1], target[1]) == pytest.approx(ref[1], rel=1e-9)
    assert psnr(pred, target) == pytest.approx(np.mean(ref), rel=1e-9)
    u8 = (target * 255).round().astype(np.uint8)
    assert psnr(u8, u8[..., ::-1].copy()) == pytest.approx(psnr(u8 / 255.0, u8[..., ::-1] / 255.0))
    assert psnr(target, target) == math.inf


def test_psnr_mask_uses_only_masked_pixels():
    target = np.zeros((8, 8, 3))
    pred = np.full((8, 8, 3), 0.5)
    pred[:4] = 0.2  # error 0.2 inside the mask, 0.5 outside
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    assert psnr(pred, target, mask) == pytest.approx(10 * math.log10(1 / 0.04))
    assert psnr(pred, target, mask.astype(np.float32)) == pytest.approx(10 * math.log10(1 / 0.04))
    with pytest.raises(ValueError, match="mask is empty"):
        psnr(pred, target, np.zeros((8, 8), bool))


def test_psnr_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(np.full((4, 4, 3), 2.0), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)))


# -------------------------------------------------------------------------------------------------------- mask IoU


def test_mask_iou_known_overlap_and_empty_masks():
    a = np.zeros((20, 20))
    b = np.zeros((20, 20))
    a[0:10], b[5:15] = 1.0, 1.0
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a > 0, a > 0) == 1.0
    empty = np.zeros((20, 20))
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(np.stack([a, empty]), np.stack([b, empty])) == pytest.approx((1 / 3 + 1) / 2)
    assert mask_iou((a * 255).astype(np.uint8), (b * 255).astype(np.uint8)) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="alpha shapes differ"):
        mask_iou(a, b[:10])


# ------------------------------------------------------------------------------------------------ evaluation views


def test_eval_views_are_the_protocols_24_cameras():
    cams = eval_views()
    assert len(cams) == 24
    assert [c.elevation_deg for c in cams] == [30.0] * 12 + [0.0] * 12
    assert [c.azimuth_deg for c in cams[:12]] == [30.0 * k for k in range(12)]
    assert [c.azimuth_deg for c in cams[12:]] == [30.0 * k for k in range(12)]
    d = framing_distance(30.0, 0.9)
    for c in cams:
        assert np.linalg.norm(c.position) == pytest.approx(d)
        uv, z = c.project(np.zeros(3))  # every camera looks at the origin
        assert uv == pytest.approx([c.width / 2, c.height / 2])
        assert z == pytest.approx(d)
    z_pos = np.array([c.position[2] for c in cams])
    assert z_pos[:12] == pytest.approx(d * math.sin(math.radians(30)))
    assert z_pos[12:] == pytest.approx(0.0, abs=1e-12)
    from dataclasses import asdict

    cfg = EvalViewsConfig(azimuth_step_deg=90.0, elevations_deg=[10.0], resolution=64, distance=2.0)
    small = eval_views(**asdict(cfg))
    assert [(c.azimuth_deg, c.elevation_deg, c.distance, c.width) for c in small] == [
        (a, 10.0, 2.0, 64) for a in (0.0, 90.0, 180.0, 270.0)
    ]
    with pytest.raises(ValueError, match="does not divide 360"):
        eval_views(25.0)
    with pytest.raises(ValueError, match="elevations"):
        eval_views(30.0, (90.0,))


# ------------------------------------------------------------------------------------------------------------ CLIP

_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from one2345pp.evaluation.appearance import _processor_class

    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPModel(CLIPConfig(vision_config=_VISION, text_config=text, projection_dim=16)).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor = _processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder, model, processor


def _views(seed, n=4, size=40):
    rng = np.random.default_rng(seed)
    base = rng.random((n, 1, 1, 3))
    return np.clip(base + 0.3 * rng.random((n, size, size, 3)), 0, 1)


def test_clip_similarity_matches_a_direct_computation(tiny_clip):
    folder, model, processor = tiny_clip
    embedder = load_clip(ClipConfig(model=str(folder), batch_size=3))
    a, b = _views(1), _views(2)
    u8a, u8b = (np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8))
    with torch.no_grad():

        def emb(u8):
            px = processor(images=list(u8), return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=px)
            e = out if torch.is_tensor(out) else out.pooler_output
            return F.normalize(e, dim=-1)

        expected = float((emb(u8a) * emb(u8b)).sum(-1).mean())
    got = clip_similarity(a, b, embedder)
    assert got == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= got < 0.9999
    assert clip_similarity(a, a, embedder) == pytest.approx(1.0, abs=1e-5)
    rgba = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
    assert clip_similarity(rgba, b, embedder) == pytest.approx(got, abs=1e-6)
    with pytest.raises(ValueError, match="same N"):
        clip_similarity(a, b[:3], embedder)


def test_clip_vision_folder_without_preprocessor(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**_VISION)).eval()
    model.save_pretrained(tmp_path)
    embedder = load_clip(str(tmp_path))
    imgs = _views(3, n=2, size=32)  # already at the input size: resize and crop are identities
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    px = (torch.from_numpy(np.round(imgs * 255) / 255).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        expected = F.normalize(model(pixel_values=px).image_embeds, dim=-1)
    assert torch.allclose(embedder.embed(imgs), expected, atol=1e-4)


def test_clip_missing_model_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        load_clip(str(missing))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------- LPIPS


def _pair(seed, noise, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g) * 0.6 + 0.2
    return x, (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPS()


def test_lpips_identical_zero_symmetric_nonnegative_grows_with_noise(random_lpips):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 3, 24, 24, generator=g) * 0.6 + 0.2).expand(5, -1, -1, -1)
    noise = torch.randn(1, 3, 24, 24, generator=g)
    levels = torch.tensor([0.0, 0.03, 0.1, 0.2, 0.4]).view(-1, 1, 1, 1)
    y = (x + levels * noise).clamp(0, 1)  # the same noise pattern at growing strength
    with torch.no_grad():
        d, d_swapped = random_lpips(x, y), random_lpips(y, x)
    assert d[0] == 0.0  # identical images
    assert torch.allclose(d, d_swapped, rtol=1e-5, atol=1e-9)
    assert (d >= 0).all()
    assert (d[1:] > d[:-1]).all(), d
    with pytest.raises(ValueError, match="at least 16x16"):
        random_lpips(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_lpips_distance_on_numpy_views(random_lpips):
    x, y = _pair(3, 0.1, size=16)
    with torch.no_grad():
        expected = float(random_lpips(x, y).mean())
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert lpips_distance(random_lpips, hwc(x), hwc(y), batch_size=1) == pytest.approx(expected, rel=1e-5)
    u8 = (hwc(x) * 255).round().astype(np.uint8)
    assert lpips_distance(random_lpips, u8, u8) == 0.0


_TORCHVISION_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _torchvision_state(seed):
    """A random state dict with the keys and shapes of torchvision's vgg16 (features + classifier)."""
    g = torch.Generator().manual_seed(seed)
    state, c_in, idx = {}, 3, 0
    for v in _TORCHVISION_CFG:
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
        state[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.01
        c_in, idx = v, idx + 2
    state["classifier.0.weight"] = torch.zeros(4, 8)  # ignored by the converter
    return state


def _reference_lpips(vgg, lin, x, y):
    """LPIPS written straight from the paper and torchvision's layer order (features indices, taps after ReLU 3, 8,
    15, 22, 29)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        h, out, idx = (img * 2 - 1 - shift) / scale, [], 0
        for v in _TORCHVISION_CFG:
            if v == "M":
                h, idx = F.max_pool2d(h, 2), idx + 1
                continue
            h = F.relu(F.conv2d(h, vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"], padding=1))
            idx += 2
            if idx - 1 in (3, 8, 15, 22, 29):
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        total = total + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def test_lpips_converter_round_trip(tmp_path):
    from safetensors.torch import load_file

    vgg = _torchvision_state(5)
    g = torch.Generator().manual_seed(6)
    lin = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c
        for k, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    out = tmp_path / "w" / "lpips.safetensors"
    assert main(["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)]) == 0
    stored = load_file(str(out))
    assert torch.equal(stored["vgg.conv1_1.weight"], vgg["features.0.weight"])
    assert torch.equal(stored["vgg.conv3_3.bias"], vgg["features.14.bias"])
    assert torch.equal(stored["vgg.conv5_3.weight"], vgg["features.28.weight"])
    assert torch.equal(stored["lin.relu4_3.weight"], lin["lin3.model.1.weight"])
    assert len(stored) == 13 * 2 + 5
    model = load_lpips(out)
    x, y = _pair(7, 0.1)
    with torch.no_grad():
        assert torch.allclose(model(x, y), _reference_lpips(vgg, lin, x, y), rtol=1e-4, atol=1e-7)
    # the VGG part of a full LPIPS model state dict (net.sliceK.<torchvision index>) converts to the same file
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    full = {
        f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
        for k, v in vgg.items()
        if k.startswith("features.")
    }
    full.update({k.replace(".model.1.", ".model."): v for k, v in lin.items()})
    again = convert_official(full, full, tmp_path / "again.safetensors")
    assert again.read_bytes() == out.read_bytes()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp")]
    bad = dict(lin, **{"lin0.model.1.weight": -lin["lin0.model.1.weight"]})
    with pytest.raises(ValueError, match="negative"):
        convert_official(vgg, bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="features.28.weight"):
        convert_official({k: v for k, v in vgg.items() if k != "features.28.weight"}, lin, tmp_path / "x.safetensors")


def test_lpips_missing_or_bad_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "weights" / "lpips_vgg16.safetensors"
    with pytest.raises(FileNotFoundError, match="lpips_vgg16.safetensors") as err:
        load_lpips(missing)
    assert str(missing) in str(err.value) and "python -m one2345pp.evaluation.lpips" in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_lpips(junk)
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({"lin.relu1_2.weight": torch.rand(1, 64, 1, 1)}, str(partial))
    with pytest.raises(ValueError, match="missing"):
        load_lpips(partial)
