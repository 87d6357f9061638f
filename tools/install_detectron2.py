#!/usr/bin/env python3
"""Install detectron2 into the running interpreter on a machine that reaches only PyPI.

Upstream detectron2 is not published on PyPI; its documented install is a source build from git.
The closest registry artefact is ``sal-detectron2==0.7.2``: a wheel of upstream detectron2 built
for CPython 3.10 only. Its Python code runs on newer interpreters, so this script re-wraps it as a
pure-Python ``detectron2`` wheel and installs that:

1. download the wheel and verify its sha256;
2. drop the compiled ``detectron2/_C*.so`` (built for 3.10: it cannot load) and the top-level
   ``tools`` package (it would shadow this project's ``tools/``);
3. rename the distribution to ``detectron2``, retag it ``py3-none-any`` / purelib and add the
   run-time requirements its metadata lacks;
4. regenerate RECORD and ``pip install`` the result.

An importable detectron2 (e.g. one built from source on a GPU machine) is kept as it is.
"""
import argparse
import base64
import hashlib
import importlib.util
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("install_detectron2")

SOURCE_DIST = "sal-detectron2"
SOURCE_VERSION = "0.7.2"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
TARGET_NAME = "detectron2"
# Requirements the source wheel's metadata does not declare but detectron2 imports at run time.
EXTRA_REQUIREMENTS = ["fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_source_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.10", "-d", str(dest), f"{SOURCE_DIST}=={SOURCE_VERSION}",
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("sal_detectron2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {SOURCE_DIST}=={SOURCE_VERSION} produced no wheel in {dest}")
    return wheels[0]


def _keep_member(name: str) -> bool:
    if name.startswith("tools/"):
        return False
    if name.startswith("detectron2/") and Path(name).name.startswith("_C") and name.endswith(".so"):
        return False
    return not (".dist-info/" in name and name.endswith(("RECORD", "WHEEL", "METADATA", "top_level.txt")))


def _rewrite_metadata(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("Name:"):
            line = f"Name: {TARGET_NAME}"
        lines.append(line)
    # Requirements go right after the existing Requires-Dist block so the header stays well-formed.
    insert_at = max(i for i, line in enumerate(lines) if line.startswith("Requires-Dist:")) + 1
    lines[insert_at:insert_at] = [f"Requires-Dist: {req}" for req in EXTRA_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def rewrap(source: Path, dest_dir: Path) -> Path:
    """Write the pure-Python ``detectron2`` wheel built from ``source`` into ``dest_dir``."""
    dist_info = f"{TARGET_NAME}-{SOURCE_VERSION}.dist-info"
    target = dest_dir / f"{TARGET_NAME}-{SOURCE_VERSION}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        source_info = next(n for n in src.namelist() if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]

        def write(name: str, data: bytes) -> None:
            out.writestr(name, data)
            records.append(_record_line(name, data))

        for name in src.namelist():
            if not _keep_member(name):
                continue
            data = src.read(name)
            if name.startswith(source_info + "/"):
                name = f"{dist_info}/{name.split('/', 1)[1]}"
            write(name, data)
        metadata = _rewrite_metadata(src.read(f"{source_info}/METADATA").decode())
        write(f"{dist_info}/METADATA", metadata.encode())
        wheel = "Wheel-Version: 1.0\nGenerator: kmax_m2f install_detectron2\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        write(f"{dist_info}/WHEEL", wheel.encode())
        write(f"{dist_info}/top_level.txt", f"{TARGET_NAME}\n".encode())
        records.append(f"{dist_info}/RECORD,,")
        out.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return target


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="use this already-downloaded sal-detectron2 wheel")
    parser.add_argument("--force", action="store_true", help="install even if detectron2 is importable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    if detectron2_importable() and not args.force:
        logger.info("detectron2 is already importable in %s; keeping it", sys.executable)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        source = args.wheel or download_source_wheel(tmp_dir)
        actual = sha256_of(source)
        if actual != SOURCE_SHA256:
            logger.error(
                "%s has sha256 %s, expected %s. The registry served a different file: refusing to "
                "install it. Delete it and retry, or install detectron2 from source.",
                source, actual, SOURCE_SHA256,
            )
            return 1
        target = rewrap(source, tmp_dir)
        subprocess.run([sys.executable, "-m", "pip", "install", str(target)], check=True)
    logger.info("installed %s %s (pure Python, no _C) into %s", TARGET_NAME, SOURCE_VERSION, sys.executable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
