"""Real-asset conventions: glTF files written here by hand (the glTF 2.0 JSON + binary chunk), read as a glTF viewer
and Blender's importer show them: +Y up turned +Z up, COLOR_0, unlit / emissive materials, texture transforms, alpha
modes, node hierarchies, Draco; and the keys of the Objaverse source."""

import io
import json
import math
import struct

import numpy as np
import pytest

from one2345pp.data.config import DataConfig, RenderConfig, VolumeConfig
from one2345pp.data.sample import build_sample
from one2345pp.data.sources import objaverse_items
from one2345pp.geometry.gltf import linear_to_srgb, srgb_to_linear
from one2345pp.geometry.mesh import MeshError
from one2345pp.geometry.mesh_io import load_mesh, normalize, resolve_up_axis, save_mesh
from one2345pp.rendering.base import Light
from one2345pp.rendering.raycast import RaycastRenderer

FLAT = Light(np.array([0.0, 0.0, 1.0]), ambient=1.0, diffuse=0.0)  # shading factor 1 everywhere


class Gltf:
    """A minimal glTF writer for the tests: buffers, accessors, meshes, nodes and materials as plain JSON."""

    def __init__(self):
        self.blob = bytearray()
        self.doc = {"asset": {"version": "2.0"}, "bufferViews": [], "accessors": [], "meshes": [], "nodes": []}

    def view(self, data: bytes) -> int:
        self.blob += b"\x00" * (-len(self.blob) % 4)
        self.doc["bufferViews"].append({"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)})
        self.blob += data
        return len(self.doc["bufferViews"]) - 1

    def accessor(self, arr, ctype=5126, kind=None, normalized=False) -> int:
        arr = np.ascontiguousarray(arr)
        kind = kind or {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4"}[1 if arr.ndim == 1 else arr.shape[1]]
        acc = {"bufferView": self.view(arr.tobytes()), "componentType": ctype, "count": len(arr), "type": kind}
        if normalized:
            acc["normalized"] = True
        if kind == "VEC3" and ctype == 5126:
            acc["min"], acc["max"] = arr.min(0).tolist(), arr.max(0).tolist()
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1

    def texture(self, rgb: np.ndarray) -> int:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        self.doc.setdefault("images", []).append({"bufferView": self.view(buf.getvalue()), "mimeType": "image/png"})
        self.doc.setdefault("textures", []).append({"source": len(self.doc["images"]) - 1})
        return len(self.doc["textures"]) - 1

    def material(self, **fields) -> int:
        self.doc.setdefault("materials", []).append(fields)
        return len(self.doc["materials"]) - 1

    def primitive(self, vertices, faces, material=None, **attributes) -> dict:
        prim = {
            "attributes": {"POSITION": self.accessor(np.asarray(vertices, np.float32)), **attributes},
            "indices": self.accessor(np.asarray(faces, np.uint32).reshape(-1), 5125),
        }
        if material is not None:
            prim["material"] = material
        return prim

    def mesh(self, *primitives) -> int:
        self.doc["meshes"].append({"primitives": list(primitives)})
        return len(self.doc["meshes"]) - 1

    def node(self, **fields) -> int:
        self.doc["nodes"].append(fields)
        return len(self.doc["nodes"]) - 1

    def save(self, path, roots=None, **extra):
        doc = dict(self.doc, buffers=[{"byteLength": len(self.blob)}], **extra)
        doc.setdefault("scenes", [{"nodes": roots if roots is not None else list(range(len(self.doc["nodes"])))}])
        doc = {k: v for k, v in doc.items() if v != []}
        js = json.dumps(doc).encode()
        js += b" " * (-len(js) % 4)
        blob = bytes(self.blob) + b"\x00" * (-len(self.blob) % 4)
        head = struct.pack("<III", 0x46546C67, 2, 28 + len(js) + len(blob))
        path.write_bytes(
            head + struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(blob), 0x4E4942) + blob
        )
        return path


def box(lo, hi):
    """An axis-aligned box: 8 vertices, 12 outward-wound triangles."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    f = [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4],
         [1, 5, 7], [1, 7, 3]]  # fmt: skip
    return v, np.array(f)


def quad(z=0.0, size=0.5):
    """A square in the glTF XY plane (facing +Z, the glTF front) with UVs in glTF convention (v down)."""
    v = np.array([[-size, -size, z], [size, -size, z], [size, size, z], [-size, size, z]])
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.float32)
    return v, np.array([[0, 1, 2], [0, 2, 3]]), uv


RED, GRAY = [1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 1.0]


def capped_tower(tmp_path):
    """A tall box (+Y up, glTF's convention) with a red cap on top: the body 0.3 x 1.0 x 0.3, the cap 0.2 high."""
    g = Gltf()
    body = g.primitive(*box([-0.15, 0.0, -0.15], [0.15, 1.0, 0.15]), material=g.material(
        pbrMetallicRoughness={"baseColorFactor": GRAY}))  # fmt: skip
    cap = g.primitive(*box([-0.2, 1.0, -0.2], [0.2, 1.2, 0.2]), material=g.material(
        pbrMetallicRoughness={"baseColorFactor": RED}))  # fmt: skip
    g.node(mesh=g.mesh(body, cap))
    return g.save(tmp_path / "tower.glb")


def small_cfg(**kw):
    return DataConfig(
        view_resolution=64,
        cond_resolution=64,
        cond_samples=2,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=16),
        **kw,
    )


def decode_png(data):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def cap_above_body(rgba):
    """Red (cap) pixels lie above the gray (body) pixels of a view, and the silhouette is taller than wide."""
    px = rgba.astype(int)
    red = (px[..., 3] > 0) & (px[..., 0] > 2.5 * px[..., 1] + 20)
    body = (px[..., 3] > 0) & ~red
    assert red.sum() > 5 and body.sum() > 20
    rows_red, rows_body = np.nonzero(red)[0], np.nonzero(body)[0]
    assert rows_red.mean() < rows_body.mean() - 3
    rows, cols = np.nonzero(px[..., 3] > 0)
    return np.ptp(rows) > 1.8 * np.ptp(cols)


def test_y_up_tower_stands_upright_in_views_and_volumes(tmp_path):
    path = capped_tower(tmp_path)
    mesh = load_mesh(path)
    assert np.ptp(mesh.vertices, axis=0)[2] == pytest.approx(1.2)  # glTF's +Y is the project's +Z
    cfg = small_cfg()
    fields, _ = build_sample(mesh, "tower", mesh.source, cfg, RaycastRenderer(cfg.render), threads=1)
    for k in range(cfg.cond_samples):
        assert cap_above_body(decode_png(fields[f"cond{k}.png"]))
        grid = decode_png(fields[f"mv{k}.png"])
        r = cfg.view_resolution
        for i in range(3):
            for j in range(2):
                assert cap_above_body(grid[i * r : (i + 1) * r, j * r : (j + 1) * r])
    occ = np.load(io.BytesIO(fields["occ.npz"]))["occ"]
    xs, ys, zs = np.nonzero(occ)
    assert np.ptp(zs) > 2 * max(np.ptp(xs), np.ptp(ys))
    fine = np.load(io.BytesIO(fields["fine.npz"]))
    red = (fine["rgb"][:, 0] > 200) & (fine["rgb"][:, 1] < 50)
    assert red.any() and fine["coords"][red, 2].min() > np.percentile(fine["coords"][~red, 2], 80)
    meta = json.loads(fields["meta.json"])
    assert meta["up_axis"] == "auto" and meta["up_axis_file"] == "y"

    # the override: read as +Z up, the tower lies on its side (its long axis is the file's Y)
    lying = load_mesh(path, up_axis="z")
    assert np.argmax(np.ptp(lying.vertices, axis=0)) == 1
    assert resolve_up_axis("a.obj") == "z" and resolve_up_axis("a.GLB") == "y" and resolve_up_axis("a.glb", "z") == "z"
    with pytest.raises(ValueError, match="up_axis"):
        resolve_up_axis("a.glb", "x")


def test_gltf_front_faces_minus_y_and_writer_round_trips_upright(tmp_path):
    g = Gltf()
    v, f, _ = quad(z=0.25)  # a square in front of the origin, on glTF's +Z (front) side
    g.node(mesh=g.mesh(g.primitive(v, f)))
    mesh = load_mesh(g.save(tmp_path / "front.glb"))
    np.testing.assert_allclose(mesh.vertices[:, 1], -0.25)  # front -> -Y: the camera at azimuth 270 sees it
    # the project's own GLB files are written +Y up, so they read back in the frame they were written from
    tower = load_mesh(capped_tower(tmp_path))
    back = load_mesh(save_mesh(tower, tmp_path / "again.glb"))
    np.testing.assert_allclose(back.vertices.min(0), tower.vertices.min(0), atol=1e-6)
    np.testing.assert_allclose(back.vertices.max(0), tower.vertices.max(0), atol=1e-6)
    data = (tmp_path / "again.glb").read_bytes()
    doc = json.loads(data[20 : 20 + struct.unpack_from("<I", data, 12)[0]])
    assert np.argmax(np.subtract(doc["accessors"][0]["max"], doc["accessors"][0]["min"])) == 1  # tall along Y


def test_color_0_vertex_colours_times_base_colour(tmp_path):
    g = Gltf()
    v, f = box([0, 0, 0], [1, 1, 1])
    lin = srgb_to_linear(np.array([[0.5, 0.25, 1.0]] * 4 + [[0.2, 0.8, 0.4]] * 4))  # glTF stores linear values
    float_prim = g.primitive(v, f, g.material(pbrMetallicRoughness={"baseColorFactor": [1, 1, 1, 1]}),
                             COLOR_0=g.accessor(lin.astype(np.float32)))  # fmt: skip
    u8 = np.concatenate([np.round(lin * 255), np.full((8, 1), 255)], 1).astype(np.uint8)
    half = float(srgb_to_linear(0.5))
    byte_prim = g.primitive(v + 2, f, g.material(pbrMetallicRoughness={"baseColorFactor": [half, half, half, 1]}),
                            COLOR_0=g.accessor(u8, 5121, normalized=True))  # fmt: skip
    g.node(mesh=g.mesh(float_prim, byte_prim))
    mesh = load_mesh(g.save(tmp_path / "vc.glb"))
    assert mesh.corner_colors is not None
    got = mesh.surface_color([0, 12], [[0.0, 0.0], [0.0, 0.0]])[:, :3]  # corner 0 of each part = vertex 0
    np.testing.assert_allclose(got[0], [0.5, 0.25, 1.0], atol=1e-3)
    np.testing.assert_allclose(got[1], np.array([0.5, 0.25, 1.0]) * 0.5, atol=4e-3)
    # the fine volume's colours are the same colours
    assert (mesh.display_color([0], [[0.0, 0.0]]) == got[:1]).all()


def render_front(mesh, light=FLAT, res=48, **cfg):
    from one2345pp.cameras import Camera

    mesh, _, _ = normalize(mesh, 0.9)
    cam = Camera(270.0, 0.0, 2.0, 30.0, res, res)  # looking at the glTF front, now facing -Y
    return RaycastRenderer(RenderConfig(supersample=1, **cfg)).render(mesh, cam, light)


def test_unlit_and_emissive_materials(tmp_path):
    g = Gltf()
    v, f, _ = quad()
    unlit = g.material(pbrMetallicRoughness={"baseColorFactor": [1, 0, 0, 1]}, extensions={"KHR_materials_unlit": {}})
    glow = g.material(pbrMetallicRoughness={"baseColorFactor": [0, 0, 0, 1]}, emissiveFactor=[0, 1, 0])
    g.node(mesh=g.mesh(g.primitive(v, f, unlit)))
    g.node(mesh=g.mesh(g.primitive(v, f, glow)), translation=[1.2, 0, 0])
    g.save(tmp_path / "lights.glb", extensionsUsed=["KHR_materials_unlit"])
    mesh = load_mesh(tmp_path / "lights.glb")
    dark = Light(np.array([0.0, 1.0, 0.0]), ambient=0.2, diffuse=0.3)  # lit from behind: shaded colours are dim
    out = render_front(mesh, dark, res=64)
    hit = out.face_ids >= 0
    left = hit & (np.arange(64)[None, :] < 28)
    right = hit & (np.arange(64)[None, :] > 36)
    np.testing.assert_allclose(out.rgba[left][:, :3], np.broadcast_to([1, 0, 0], (left.sum(), 3)), atol=1e-6)
    np.testing.assert_allclose(out.rgba[right][:, :3], np.broadcast_to([0, 1, 0], (right.sum(), 3)), atol=1e-6)
    np.testing.assert_allclose(mesh.display_color([2], [[0.3, 0.3]])[0], [0, 1, 0], atol=1e-6)


def test_texture_transform_picks_the_quadrant(tmp_path):
    tex = np.zeros((16, 16, 3), np.uint8)  # quadrants of the image: red, green / blue, yellow
    tex[:8, :8], tex[:8, 8:], tex[8:, :8], tex[8:, 8:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    g = Gltf()
    v, f, uv = quad()
    t = g.texture(tex)
    plain = g.material(pbrMetallicRoughness={"baseColorTexture": {"index": t}})
    shifted = g.material(pbrMetallicRoughness={"baseColorTexture": {"index": t, "extensions": {
        "KHR_texture_transform": {"offset": [0.0, 0.5], "scale": [0.5, 0.5]}}}})  # fmt: skip
    turned = g.material(pbrMetallicRoughness={"baseColorTexture": {"index": t, "extensions": {
        "KHR_texture_transform": {"offset": [0.0, 1.0], "rotation": math.pi / 2}}}})  # fmt: skip
    for k, m in enumerate((plain, shifted, turned)):
        g.node(mesh=g.mesh(g.primitive(v, f, m, TEXCOORD_0=g.accessor(uv))), translation=[1.5 * k, 0, 0])
    mesh = load_mesh(g.save(tmp_path / "tt.glb"))
    # face 0's corners have glTF uvs (0, 1), (1, 1), (1, 0); weights (0.3, 0.1, 0.6) give uv (0.7, 0.4)
    at = np.array([[0.1, 0.6]])
    np.testing.assert_allclose(mesh.surface_color([0], at)[0, :3], [0, 1, 0], atol=1e-6)  # top right: green
    # scale 0.5, offset (0, 0.5): (0.35, 0.7), bottom left: blue
    np.testing.assert_allclose(mesh.surface_color([2], at)[0, :3], [0, 0, 1], atol=1e-6)
    # rotation 90 degrees then offset (0, 1): (u, v) -> (v, 1 - u) = (0.4, 0.3), top left: red
    np.testing.assert_allclose(mesh.surface_color([4], at)[0, :3], [1, 0, 0], atol=1e-6)


def test_mask_alpha_cuts_holes_and_blend_shows_what_is_behind(tmp_path):
    tex = np.full((4, 4, 4), 255, np.uint8)
    tex[:, :2, 3] = 40  # left half nearly transparent
    g = Gltf()
    v, f, uv = quad(z=0.2)
    t = g.texture(tex)
    mask = g.material(pbrMetallicRoughness={"baseColorTexture": {"index": t}}, alphaMode="MASK", alphaCutoff=0.5)
    back = g.material(pbrMetallicRoughness={"baseColorFactor": [0, 0, 1, 1]})
    g.node(mesh=g.mesh(g.primitive(v, f, mask, TEXCOORD_0=g.accessor(uv)), g.primitive(v * [0.5, 0.5, 0] - [0, 0, 0.2],
                                                                                    f, back)))  # fmt: skip
    mesh = load_mesh(g.save(tmp_path / "mask.glb"))
    out = render_front(mesh, res=64)
    cols = np.arange(64)[None, :]
    rows = np.arange(64)[:, None]
    middle = (rows > 24) & (rows < 40)
    # the masked-out half shows the blue square behind it (or nothing); the kept half is white
    left = out.rgba[middle & (cols > 22) & (cols < 30)]
    assert np.allclose(left[:, :3], [0, 0, 1], atol=1e-5) and (left[:, 3] == 1).all()
    right = out.rgba[middle & (cols > 40) & (cols < 50)]
    np.testing.assert_allclose(right, np.broadcast_to([1, 1, 1, 1], right.shape), atol=1e-5)
    far_left = middle & (cols > 12) & (cols < 18)  # masked, nothing behind (u near 0 wraps: REPEAT)
    assert (out.rgba[far_left][:, 3] == 0).all() and (out.face_ids[far_left] == -1).all()

    # OPAQUE ignores the texture's alpha; BLEND composites it over the blue square
    for mode, expect in (("OPAQUE", [1, 1, 1, 1]), ("BLEND", None)):
        g.doc["materials"][mask]["alphaMode"] = mode
        m2 = load_mesh(g.save(tmp_path / f"{mode}.glb"))
        px = render_front(m2, res=64).rgba[middle & (cols > 19) & (cols < 25)]  # alpha 40 texels, blue behind
        if expect is not None:
            np.testing.assert_allclose(px, np.broadcast_to(expect, px.shape), atol=1e-5)
        else:
            a = 40 / 255
            np.testing.assert_allclose(px[:, :3], np.broadcast_to([a, a, a + (1 - a)], px[:, :3].shape), atol=2e-3)
            np.testing.assert_allclose(px[:, 3], 1.0, atol=1e-6)


def test_single_sided_backs_are_drawn_unless_culled(tmp_path):
    g = Gltf()
    v, f, _ = quad()
    g.node(mesh=g.mesh(g.primitive(v, f[:, ::-1], g.material(doubleSided=False))))  # faces away from the camera
    mesh = load_mesh(g.save(tmp_path / "one_sided.glb"))
    assert not mesh.materials[0].double_sided
    assert (render_front(mesh).face_ids >= 0).sum() > 100  # drawn, as Cycles draws it
    assert (render_front(mesh, cull_back_faces=True).face_ids >= 0).sum() == 0


def test_node_hierarchy_with_rotation_and_scale(tmp_path):
    g = Gltf()
    v, f = box([0, 0, 0], [1, 1, 1])
    m = g.mesh(g.primitive(v, f))
    s = math.sqrt(0.5)
    child = g.node(mesh=m, translation=[0, 0, 1], scale=[1, 2, 1])  # y scaled by 2, then moved +1 along z
    mirrored = g.node(mesh=m, matrix=[-1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 10, 0, 0, 1])  # x mirrored, at x = 10
    root = g.node(children=[child], rotation=[s, 0, 0, s], translation=[5, 0, 0])  # 90 degrees about +X
    mesh = load_mesh(g.save(tmp_path / "tree.glb", roots=[root, mirrored]), up_axis="z")
    part = mesh.vertices[:8]
    # child: x in [0, 1], y in [0, 2], z in [1, 2]; rotated about X by 90: (x, y, z) -> (x, -z, y); then +5 in x
    np.testing.assert_allclose(part.min(0), [5, -2, 0], atol=1e-9)
    np.testing.assert_allclose(part.max(0), [6, -1, 2], atol=1e-9)
    np.testing.assert_allclose(mesh.vertices[8:].min(0), [9, 0, 0], atol=1e-9)
    # the mirrored copy keeps its faces outward: its winding was reversed
    nrm = mesh.face_normals()[12:]
    centre = mesh.vertices[8:].mean(0)
    outward = np.einsum("nc,nc->n", nrm, mesh.vertices[mesh.faces[12:]].mean(1) - centre)
    assert (outward > 0).all()


def test_draco_compressed_file_is_decoded(tmp_path):
    DracoPy = pytest.importorskip("DracoPy")
    v, f = box([0, 0, 0], [0.5, 2.0, 0.5])
    cols = np.tile(np.array([[255, 0, 0]], np.uint8), (8, 1))
    data = DracoPy.encode(v.astype(np.float32), f.astype(np.uint32), quantization_bits=16, colors=cols)
    g = Gltf()
    bv = g.view(data)
    g.doc["accessors"] += [
        {"componentType": 5126, "count": 8, "type": "VEC3", "min": [0, 0, 0], "max": [0.5, 2, 0.5]},
        {"componentType": 5125, "count": 36, "type": "SCALAR"},
    ]
    decoded = DracoPy.decode(data)
    ids = {a["attribute_type"]: a["unique_id"] for a in decoded.attributes}
    draco_attrs = {"POSITION": ids[DracoPy.AttributeType.POSITION], "COLOR_0": ids[DracoPy.AttributeType.COLOR]}
    g.doc["accessors"].append({"componentType": 5121, "count": 8, "type": "VEC3", "normalized": True})
    draco = {"bufferView": bv, "attributes": draco_attrs}
    prim = {"attributes": {"POSITION": 0, "COLOR_0": 2}, "indices": 1, "material": g.material()}
    prim["extensions"] = {"KHR_draco_mesh_compression": draco}
    g.node(mesh=g.mesh(prim))
    path = g.save(tmp_path / "draco.glb", extensionsUsed=["KHR_draco_mesh_compression"],
                  extensionsRequired=["KHR_draco_mesh_compression"])  # fmt: skip
    mesh = load_mesh(path)
    assert mesh.num_faces == 12
    np.testing.assert_allclose(np.ptp(mesh.vertices, axis=0), [0.5, 0.5, 2.0], atol=1e-3)  # upright
    assert mesh.corner_colors is not None
    np.testing.assert_allclose(mesh.surface_color([0], [[0.2, 0.2]])[0], [1, 0, 0, 1], atol=1e-6)


def test_meshopt_and_broken_draco_name_the_compression(tmp_path):
    g = Gltf()
    v, f = box([0, 0, 0], [1, 1, 1])
    g.node(mesh=g.mesh(g.primitive(v, f)))
    path = g.save(tmp_path / "meshopt.glb", extensionsUsed=["EXT_meshopt_compression"],
                  extensionsRequired=["EXT_meshopt_compression"])  # fmt: skip
    with pytest.raises(MeshError, match="meshopt-compressed"):
        load_mesh(path)
    g2 = Gltf()
    bv = g2.view(b"not draco data at all")
    g2.doc["accessors"].append({"componentType": 5126, "count": 3, "type": "VEC3"})
    prim = {"attributes": {"POSITION": 0}, "extensions": {"KHR_draco_mesh_compression": {
        "bufferView": bv, "attributes": {"POSITION": 0}}}}  # fmt: skip
    g2.node(mesh=g2.mesh(prim))
    with pytest.raises(MeshError, match="Draco-compressed"):
        load_mesh(g2.save(tmp_path / "bad_draco.glb"))


def test_shard_build_records_compression_reason_and_goes_on(tmp_path):
    from one2345pp.data.shards import build_shards

    inputs = tmp_path / "in"
    inputs.mkdir()
    capped_tower(inputs)
    g = Gltf()
    v, f = box([0, 0, 0], [1, 1, 1])
    g.node(mesh=g.mesh(g.primitive(v, f)))
    g.save(inputs / "packed.glb", extensionsRequired=["EXT_meshopt_compression"])
    res = build_shards("objaverse", tmp_path / "out", small_cfg(), input_path=str(inputs), progress=False)
    assert res.done == 1 and res.failed == 1
    assert dict(res.failures)["packed"].startswith("meshopt-compressed (EXT_meshopt_compression)")
    assert "up_axis: auto" in (tmp_path / "out" / "config.yaml").read_text()


def test_objaverse_keys_are_uids_with_stable_suffixes(tmp_path):
    uid = "8476c4170df24cf5bbe6967222d1a42d"
    for folder in ("a/b", "c"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / f"{uid}.glb").write_bytes(b"x")
    (tmp_path / "c" / "other.glb").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"a/b/{uid}.glb\nc/other.glb\nc/{uid}.glb\n0123abcd\n")
    items = objaverse_items(listing)
    keys = [it.uid for it in items]
    assert keys[1] == "other" and keys[3] == "0123abcd" and items[3].objaverse_uid == "0123abcd"
    assert keys[0].startswith(uid + "-") and keys[2].startswith(uid + "-") and keys[0] != keys[2]
    # stable: the same inputs in another order keep their keys
    listing.write_text(f"c/{uid}.glb\nc/other.glb\na/b/{uid}.glb\n")
    again = {it.path: it.uid for it in objaverse_items(listing)}
    assert again[items[0].path] == keys[0] and again[items[2].path] == keys[2]
    # a folder of GLBs is keyed the same way (relative paths as the names)
    by_folder = {it.path: it.uid for it in objaverse_items(tmp_path)}
    assert by_folder[str(tmp_path / "c" / "other.glb")] == "other"


def test_colour_space_helpers_invert_each_other():
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-5)
