"""The one atomic writer, folder swap and check-or-save-config: complete results or nothing, and clear refusals."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from one2345pp.config import ConfigError, check_or_save_config
from one2345pp.utils.atomic import (
    atomic_file,
    atomic_files,
    atomic_folder,
    write_bytes,
    write_json,
    write_png,
    write_text,
)


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_writers_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert write_text(tmp_path / "t.txt", "x\n").read_text() == "x\n"
    assert write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(write_png(tmp_path / "i.png", img))), img)
    assert _hidden(tmp_path) == [] and _hidden(path.parent) == []


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        assert tmp.name.startswith(".tmp-a.txt-") and tmp.suffix == ".tmp" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert _hidden(tmp_path) == []
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"x": float("nan")}, allow_nan=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_folder_swap_is_whole_or_nothing(tmp_path):
    folder = tmp_path / "out"
    with atomic_folder(folder) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_folder(folder) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]  # replaced, not merged
    with pytest.raises(RuntimeError), atomic_folder(folder) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("killed")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert _hidden(tmp_path) == []


def test_sidecar_files_move_together_or_not_at_all(tmp_path):
    with atomic_files(tmp_path, last="m.obj") as tmp:
        (tmp / "m.mtl").write_text("mtl")
        (tmp / "m.obj").write_text("obj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mtl", "m.obj"]
    with pytest.raises(RuntimeError), atomic_files(tmp_path, last="n.obj") as tmp:
        (tmp / "n.mtl").write_text("mtl")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mtl", "m.obj"]


@dataclass
class _Inner:
    size: int = 4
    threads: int = 1


@dataclass
class _Cfg:
    name: str = "a"
    inner: _Inner = field(default_factory=_Inner)


def test_check_or_save_config_saves_then_accepts_the_same_settings(tmp_path):
    path = tmp_path / "config.yaml"
    cfg = OmegaConf.structured(_Cfg)
    check_or_save_config(path, cfg, what="a test", remedy="use another folder")
    assert OmegaConf.load(path) == cfg
    again = OmegaConf.merge(cfg, {"inner": {"threads": 8}})
    check_or_save_config(path, again, what="a test", remedy="x", ignore=["inner.threads"])
    assert OmegaConf.load(path).inner.threads == 8  # the latest run is recorded
    check_or_save_config(path, cfg, what="a test", remedy="x", ignore=["inner.threads"], keep=True)
    assert OmegaConf.load(path).inner.threads == 8  # ... unless the first one is kept


def test_check_or_save_config_names_the_file_and_keys(tmp_path):
    path = tmp_path / "config.yaml"
    check_or_save_config(path, OmegaConf.structured(_Cfg), what="a test", remedy="use another folder")
    other = OmegaConf.structured(_Cfg(name="b", inner=_Inner(size=8)))
    with pytest.raises(ConfigError) as err:
        check_or_save_config(path, other, what="a test", remedy="use another folder")
    msg = str(err.value)
    assert str(path) in msg and "inner.size, name differ" in msg and "use another folder" in msg
    assert OmegaConf.load(path).name == "a"  # the refused settings are not written
    path.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"(?s)config\.yaml: unreadable .*use another folder"):
        check_or_save_config(path, other, what="a test", remedy="use another folder")
