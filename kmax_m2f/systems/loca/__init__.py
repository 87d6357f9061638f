"""LOCA (Caron et al., 2022): location-aware self-supervised pre-training of the project's ViT.

``LOCA`` is a meta-architecture trained by ``tools/train_net.py`` on the ``loca`` mapper's views
of any images (a catalog dataset's, or a folder's: ``DATASETS.TRAIN ("folder:/path",)``);
``LocalizationEvaluator`` reports the held-out localisation accuracy;
``tools/export_loca_backbone.py`` writes the ViT's weights for StructToken, ReSTR or any ViT
config.
"""
from .config import add_config
from .export import export_backbone
from .mapper import LocaViewMapper
from .meta_arch import LOCA, TeacherEMAHook, teacher_momentum

__all__ = ["LOCA", "LocaViewMapper", "TeacherEMAHook", "add_config", "export_backbone", "teacher_momentum"]
