"""What the systems share: backbones, the Hungarian matcher, losses and set-criterion helpers,
post-processing helpers, the mask-classification and sliding-window meta-architectures, position
encodings. Importing this package registers the backbones and meta-architectures."""
from . import backbone  # noqa: F401
from . import meta_arch  # noqa: F401
