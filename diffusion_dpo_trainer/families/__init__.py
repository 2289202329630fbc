"""Model families: everything that differs between model architectures lives here, one module per family.

Every module of this package is imported here, and defining a family class registers it (see `base.py`), so a new
family is one new file.
"""

import importlib
import pkgutil

from .base import FAMILIES, REGISTRY, DiffusionFamily
from .registry import family_class_for, family_class_of, load_family, load_pipeline

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .flow import FlowMatchingFamily  # noqa: E402  (re-exported names of the built-in families)
from .flux import FluxFamily  # noqa: E402
from .sd import StableDiffusionFamily  # noqa: E402
from .sd3 import StableDiffusion3Family  # noqa: E402
from .sdxl import StableDiffusionXLFamily  # noqa: E402

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "DiffusionFamily",
    "FlowMatchingFamily",
    "FluxFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "family_class_for",
    "family_class_of",
    "load_family",
    "load_pipeline",
]
