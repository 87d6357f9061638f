"""tools/install_detectron2.py re-wraps the registry's CPython-3.10 wheel as a pure-Python one."""
import base64
import csv
import hashlib
import importlib.util
import io
import zipfile

from .conftest import REPO

spec = importlib.util.spec_from_file_location("install_detectron2", REPO / "tools" / "install_detectron2.py")
install_detectron2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_detectron2)


def _fake_source_wheel(path):
    info = "sal_detectron2-0.7.2.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("detectron2/__init__.py", "__version__ = '0.7.2'\n")
        whl.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
        whl.writestr("detectron2/layers/__init__.py", "")
        whl.writestr("tools/train_net.py", "print('shadow')\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: sal-detectron2\nVersion: 0.7.2\n"
                     "Requires-Dist: numpy<2\nRequires-Dist: yacs>=0.1.8\nProvides-Extra: all\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-cp310-linux_x86_64\n")
        whl.writestr(f"{info}/top_level.txt", "detectron2\ntools\n")
        whl.writestr(f"{info}/LICENSE", "Apache-2.0\n")
        whl.writestr(f"{info}/RECORD", "stale\n")


def test_rewrap_makes_a_consistent_pure_python_detectron2_wheel(tmp_path):
    source = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    _fake_source_wheel(source)
    target = install_detectron2.rewrap(source, tmp_path)
    assert target.name == "detectron2-0.7.2-py3-none-any.whl"
    with zipfile.ZipFile(target) as whl:
        names = set(whl.namelist())
        assert "detectron2/__init__.py" in names and "detectron2/layers/__init__.py" in names
        assert not any(n.startswith("tools/") or n.endswith(".so") or "sal_detectron2" in n for n in names)
        metadata = whl.read("detectron2-0.7.2.dist-info/METADATA").decode()
        assert "Name: detectron2\n" in metadata
        assert "Requires-Dist: fvcore>=0.1.5,<0.1.6" in metadata and "Requires-Dist: numpy<2" in metadata
        # Requirements stay in the header block, before the extras.
        assert metadata.index("fvcore") < metadata.index("Provides-Extra")
        wheel = whl.read("detectron2-0.7.2.dist-info/WHEEL").decode()
        assert "Root-Is-Purelib: true" in wheel and "Tag: py3-none-any" in wheel
        rows = list(csv.reader(io.StringIO(whl.read("detectron2-0.7.2.dist-info/RECORD").decode())))
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                continue
            data = whl.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))


def test_wrong_checksum_is_refused(tmp_path, monkeypatch, caplog):
    source = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    _fake_source_wheel(source)
    monkeypatch.setattr(install_detectron2, "detectron2_importable", lambda: False)
    monkeypatch.setattr("sys.argv", ["install_detectron2.py", "--wheel", str(source)])
    assert install_detectron2.main() == 1
    assert "refusing to install" in caplog.text


def test_an_importable_detectron2_is_kept(monkeypatch, caplog):
    monkeypatch.setattr("sys.argv", ["install_detectron2.py"])
    caplog.set_level("INFO")
    assert install_detectron2.main() == 0
    assert "keeping it" in caplog.text
