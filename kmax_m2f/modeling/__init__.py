"""Models: backbones, pixel decoders, transformer decoders, matchers, criteria, meta-architectures.
Importing this package registers them with detectron2's registries."""
from . import backbone  # noqa: F401
