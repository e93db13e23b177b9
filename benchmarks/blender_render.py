"""Blender side of ``bench_blender.py``: runs under the Python of the ``bpy`` virtualenv (never the project's).

    .venv-blender/bin/python benchmarks/blender_render.py JOB.json

JOB.json: ``{"samples", "threads", "ambient", "diffuse", "light_dir", "objects": [{"path", "out", "scale",
"offset", "cameras": [{"c2w" (OpenCV, 4x4), "fov_deg" (horizontal), "width", "height"}]}]}``. Each object is
imported with Blender's own importers (glTF: ``import_scene.gltf``, which turns +Y up into +Z up; OBJ:
``wm.obj_import`` with up axis Z, as Blender-based Google Scanned Objects loaders do), moved by the project's
normalisation (``v * scale + offset`` in world space) and rendered with Cycles on the CPU: a transparent film,
a uniform world of strength ``ambient`` and a sun of strength ``pi * diffuse`` towards ``light_dir`` (the project's
Lambert + ambient light), Standard view transform. Writes ``out/view{i}.png`` (RGBA) and ``out/timing.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import bpy
from mathutils import Matrix, Vector


def reset_scene(job: dict):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = int(job["samples"])
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 4
    scene.render.threads_mode = "FIXED"
    scene.render.threads = int(job["threads"])
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.view_settings.view_transform = "Standard"
    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    bg = world.node_tree.nodes["Background"]
    bg.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    bg.inputs["Strength"].default_value = float(job["ambient"])
    scene.world = world
    sun = bpy.data.lights.new("sun", type="SUN")
    sun.energy = math.pi * float(job["diffuse"])
    sun.angle = 0.0
    sun_obj = bpy.data.objects.new("sun", sun)
    scene.collection.objects.link(sun_obj)
    # a sun shines along its local -Z: point -Z along -light_dir
    sun_obj.rotation_euler = Vector(job["light_dir"]).to_track_quat("Z", "Y").to_euler()
    cam = bpy.data.cameras.new("cam")
    cam.sensor_fit = "HORIZONTAL"
    cam_obj = bpy.data.objects.new("cam", cam)
    scene.collection.objects.link(cam_obj)
    scene.camera = cam_obj
    return scene, cam_obj


def import_mesh(path: str):
    before = set(bpy.data.objects)
    if path.lower().endswith((".glb", ".gltf")):
        bpy.ops.import_scene.gltf(filepath=path)
    elif path.lower().endswith(".obj"):
        bpy.ops.wm.obj_import(filepath=path, up_axis="Z", forward_axis="Y")
    elif path.lower().endswith(".ply"):
        bpy.ops.wm.ply_import(filepath=path, up_axis="Z", forward_axis="Y")
    elif path.lower().endswith(".stl"):
        bpy.ops.wm.stl_import(filepath=path, up_axis="Z", forward_axis="Y")
    else:
        raise ValueError(f"no Blender importer chosen for {path}")
    return [o for o in bpy.data.objects if o not in before]


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    flip = Matrix(((1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, 1)))  # OpenCV camera -> Blender camera
    for obj in job["objects"]:
        out = Path(obj["out"])
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        scene, cam_obj = reset_scene(job)
        new = import_mesh(obj["path"])
        s, off = float(obj["scale"]), obj["offset"]
        normalise = Matrix.Translation(Vector(off)) @ Matrix.Diagonal((s, s, s, 1.0))
        for o in new:
            if o.parent is None:
                o.matrix_world = normalise @ o.matrix_world
        t_import = time.perf_counter() - t0
        for i, cam in enumerate(obj["cameras"]):
            scene.render.resolution_x, scene.render.resolution_y = int(cam["width"]), int(cam["height"])
            scene.render.resolution_percentage = 100
            cam_obj.data.angle = math.radians(float(cam["fov_deg"]))
            cam_obj.matrix_world = Matrix(cam["c2w"]) @ flip
            scene.render.filepath = str(out / f"view{i}.png")
            bpy.ops.render.render(write_still=True)
        seconds = time.perf_counter() - t0
        (out / "timing.json").write_text(json.dumps({"seconds": seconds, "import_seconds": t_import}))
        print(f"blender: {obj['path']}: {len(obj['cameras'])} views in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
