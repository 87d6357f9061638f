"""The segmentation systems, one package each (``mask2former``, ``kmax_deeplab``,
``struct_token``, ...).

A system is a module that registers its parts in detectron2's registries when imported
(meta-architecture, heads, mappers) and may define ``add_config(cfg)`` to declare its config keys.
Every subpackage of this package is a system; so is every module named in the environment
variable ``KMAX_M2F_SYSTEMS`` (comma-separated import paths), which adds a system that lives
outside this package without editing it. Importing this package imports them all.
"""
import importlib
import os
import pkgutil
from types import ModuleType

from detectron2.config import CfgNode

__all__ = ["EXTRA_SYSTEMS_VARIABLE", "add_systems_config", "registered_systems"]

EXTRA_SYSTEMS_VARIABLE = "KMAX_M2F_SYSTEMS"

_systems: dict[str, ModuleType] = {}


def _import_systems() -> dict[str, ModuleType]:
    if not _systems:
        names = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__) if info.ispkg]
        names += [name.strip() for name in os.environ.get(EXTRA_SYSTEMS_VARIABLE, "").split(",") if name.strip()]
        for name in names:
            try:
                _systems[name] = importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name != name:
                    raise
                raise ModuleNotFoundError(
                    f"{EXTRA_SYSTEMS_VARIABLE} names the module {name!r}, which cannot be imported: put its folder "
                    "on PYTHONPATH or fix the name."
                ) from e
    return _systems


def registered_systems() -> dict[str, ModuleType]:
    """{import path: module} of every system, in import order."""
    return dict(_import_systems())


def add_systems_config(cfg: CfgNode) -> None:
    """Add every system's config keys (its ``add_config(cfg)``, when it has one)."""
    for module in _import_systems().values():
        add_config = getattr(module, "add_config", None)
        if add_config is not None:
            add_config(cfg)


_import_systems()
