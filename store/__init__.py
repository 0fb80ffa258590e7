"""store/ — every on-disk format: images, manifests, the zarr activation store, the annotation database, settings.

Heavy modules (zarr, SQLAlchemy) are imported by their own submodules, not here.
"""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .images import MedicalImage, pseudonym, read_image
from .manifest import Manifest, PatchRecord, read_manifest, write_manifest
from .segment import Segmentation, SegmentConfig, segment_breast
from .settings import Settings, load_settings

__all__ = [
    *_errors_all,
    "MedicalImage", "read_image", "pseudonym",
    "Segmentation", "SegmentConfig", "segment_breast",
    "Manifest", "PatchRecord", "read_manifest", "write_manifest",
    "Settings", "load_settings",
]
