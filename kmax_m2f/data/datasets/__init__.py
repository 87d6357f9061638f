"""Dataset registrations that detectron2 does not ship. Importing this module registers them."""
from . import synthetic  # noqa: F401
from . import register_ade20k_instance  # noqa: F401
from . import register_ade20k_panoptic  # noqa: F401
from . import register_coco_panoptic_annos_semseg  # noqa: F401
from . import register_coco_stuff_10k  # noqa: F401
from . import refer  # noqa: F401
from . import image_folder  # noqa: F401
