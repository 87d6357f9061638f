"""Dataset registrations that detectron2 does not ship. Importing this module registers them."""
from . import synthetic  # noqa: F401
