"""store/ — every on-disk format: images, manifests, the zarr activation store, the annotation database, settings."""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .manifest import Manifest, PatchRecord, read_manifest, write_manifest
from .settings import Settings, load_settings

__all__ = [*_errors_all, "Manifest", "PatchRecord", "read_manifest", "write_manifest", "Settings", "load_settings"]
