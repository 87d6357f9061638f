"""Models: backbones, pixel decoders, transformer decoders, matchers, criteria, meta-architectures.
Importing this package registers them with detectron2's registries."""
from . import backbone  # noqa: F401
from . import heads  # noqa: F401
from . import meta_arch  # noqa: F401
from . import pixel_decoder  # noqa: F401
from . import transformer_decoder  # noqa: F401
