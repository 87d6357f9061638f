"""Input checks shared by the dataset loaders: each failure names the file and the fix."""
import contextlib
import json
import os
from typing import Any, Iterator


class DatasetError(RuntimeError):
    """A dataset on disk is missing, incomplete or inconsistent with its annotations."""


def datasets_root() -> str:
    """The root of all datasets: ``$DETECTRON2_DATASETS`` (detectron2's convention), else ./datasets."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _missing(kind: str, path: str, dataset_name: str, hint: str) -> DatasetError:
    return DatasetError(
        f"Dataset '{dataset_name}': {kind} {path!r} does not exist. Datasets are read from "
        f"$DETECTRON2_DATASETS (now {datasets_root()!r}); see datasets/README.md for the "
        f"expected layout. {hint}".strip()
    )


def require_dir(path: str, dataset_name: str, hint: str = "") -> str:
    """``path`` if it is a directory, else a DatasetError naming it, the root and ``hint``."""
    if not os.path.isdir(path):
        raise _missing("directory", path, dataset_name, hint)
    return path


def require_file(path: str, dataset_name: str, hint: str = "") -> str:
    """``path`` if it is a file, else a DatasetError naming it, the root and ``hint``."""
    if not os.path.isfile(path):
        raise _missing("file", path, dataset_name, hint)
    return path


@contextlib.contextmanager
def missing_files_named(dataset_names: list[str]) -> Iterator[None]:
    """Turn a FileNotFoundError met while loading ``dataset_names`` (detectron2's own COCO /
    ADE20K / Cityscapes loaders raise them) into a DatasetError that names the file, the
    datasets root and the README."""
    try:
        yield
    except FileNotFoundError as e:
        raise _missing("file or directory", e.filename or str(e), ", ".join(dataset_names), "") from e


@contextlib.contextmanager
def json_file_errors(path: str, dataset_name: str) -> Iterator[None]:
    """Turn a missing or corrupt JSON file met inside the block (also by detectron2's own
    loaders) into a DatasetError that names the file and the fix."""
    require_file(path, dataset_name)
    try:
        yield
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"Dataset '{dataset_name}': {path!r} is not valid JSON ({e}). The file is corrupt or "
            f"truncated: re-create it (datasets/prepare_*.py) or download it again."
        ) from e


def load_json(path: str, dataset_name: str) -> Any:
    """``json.load`` whose errors say which dataset file is missing or corrupt."""
    with json_file_errors(path, dataset_name), open(path) as f:
        return json.load(f)


def require_keys(record: dict, keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(f"{where} lacks the field(s) {missing}; found {sorted(record)}.")


def require_listed_files(
    paths: list[str], dataset_name: str, json_file: str, hint: str = ""
) -> None:
    """Raise a :class:`DatasetError` if any of ``paths`` (files that ``json_file`` refers to) is
    missing. One directory listing per folder instead of one ``stat`` per file keeps this cheap
    for the 118k COCO images."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if name not in listings[folder]:
            missing.append(path)
    if missing:
        raise DatasetError(
            f"Dataset '{dataset_name}': {len(missing)} of the {len(paths)} files that "
            f"{json_file!r} refers to do not exist, e.g. {missing[:3]}. The annotations and the "
            f"files on disk come from different versions or an extraction was incomplete. {hint}"
        )
