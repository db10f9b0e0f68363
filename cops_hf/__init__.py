"""cops-hf: CoPS zero-shot anomaly detection on transformers' CLIP.

``import cops_hf`` registers `CoPSConfig`, `CoPSForAnomalyDetection` and `CoPSProcessor` with transformers' Auto
classes and the "anomaly-detection" pipeline task, and registers them for the Auto classes' remote code: every
`save_pretrained` folder and `push_to_hub` repository carries an `auto_map` and the code files, so it also loads
with `trust_remote_code=True` where cops_hf is not installed. Where it is installed, its own classes win over those
copies (transformers prefers explicitly registered classes), so a copy never runs stale code.

The import itself is instant: torch and transformers are not imported by it. If transformers is already imported,
the classes are registered at once; otherwise as soon as transformers (or any cops_hf module that needs it) has
finished importing. The public names below load their module on first access.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

_PUBLIC_NAMES = {
    "TEST_DATASET_PRESETS": "configuration_cops",
    "TRAIN_DATASET_PRESETS": "configuration_cops",
    "CoPSConfig": "configuration_cops",
    "CoPSAnomalyDetectionOutput": "modeling_cops",
    "CoPSForAnomalyDetection": "modeling_cops",
    "CoPSVisionOutput": "modeling_cops",
    "AnomalyDetectionPipeline": "pipeline_anomaly_detection",
    "CoPSImageProcessor": "processing_cops",
    "CoPSProcessor": "processing_cops",
    "ImageLoadError": "image_utils",
}

if TYPE_CHECKING:
    from .configuration_cops import TEST_DATASET_PRESETS, TRAIN_DATASET_PRESETS, CoPSConfig
    from .image_utils import ImageLoadError
    from .modeling_cops import CoPSAnomalyDetectionOutput, CoPSForAnomalyDetection, CoPSVisionOutput
    from .pipeline_anomaly_detection import AnomalyDetectionPipeline
    from .processing_cops import CoPSImageProcessor, CoPSProcessor


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC_NAMES)


_registered = False


def register_with_transformers() -> None:
    """Register the CoPS classes with transformers' Auto classes and the "anomaly-detection" pipeline task.

    Called automatically (see the module docstring); calling it again does nothing.
    """
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

    from .configuration_cops import CoPSConfig
    from .modeling_cops import CoPSForAnomalyDetection
    from .pipeline_anomaly_detection import TASK, AnomalyDetectionPipeline, register_pipeline
    from .processing_cops import CoPSImageProcessor, CoPSProcessor

    AutoConfig.register(CoPSConfig.model_type, CoPSConfig, exist_ok=True)
    AutoModel.register(CoPSConfig, CoPSForAnomalyDetection, exist_ok=True)
    AutoImageProcessor.register(CoPSConfig, slow_image_processor_class=CoPSImageProcessor, exist_ok=True)
    AutoProcessor.register(CoPSConfig, CoPSProcessor, exist_ok=True)
    register_pipeline()
    CoPSConfig.served_pipeline_tasks.add(TASK)
    CoPSForAnomalyDetection.companion_pipelines[TASK] = AnomalyDetectionPipeline
    CoPSConfig.register_for_auto_class()
    CoPSForAnomalyDetection.register_for_auto_class("AutoModel")
    CoPSImageProcessor.register_for_auto_class("AutoImageProcessor")
    CoPSProcessor.register_for_auto_class("AutoProcessor")


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps the loader of a watched module: runs it, then registers once no watched module is still executing.

    The original loader is left untouched; every other attribute (resources, source) is delegated to it.
    """

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterAfterTransformersImport) -> None:
        self.loader = loader
        self.finder = finder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.finder.executing += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.executing -= 1
        if not self.finder.executing and "transformers" in sys.modules and not _registered:
            if self.finder in sys.meta_path:
                sys.meta_path.remove(self.finder)
            register_with_transformers()


class _RegisterAfterTransformersImport(importlib.abc.MetaPathFinder):
    """Calls `register_with_transformers` once transformers is imported and no cops_hf module is mid-import.

    It watches the imports of ``transformers`` and of this package's modules (their specs get a
    `_RegisteringLoader`): registration imports cops_hf's modules, which must not happen while one of them is still
    executing (it would see it half-defined).
    """

    def __init__(self) -> None:
        self.executing = 0

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if _registered or not (fullname == "transformers" or fullname.startswith(f"{__name__}.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


if "transformers" in sys.modules:
    register_with_transformers()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformersImport())

__all__ = [
    "TEST_DATASET_PRESETS",
    "TRAIN_DATASET_PRESETS",
    "AnomalyDetectionPipeline",
    "CoPSAnomalyDetectionOutput",
    "CoPSConfig",
    "CoPSForAnomalyDetection",
    "CoPSImageProcessor",
    "CoPSProcessor",
    "CoPSVisionOutput",
    "ImageLoadError",
    "register_with_transformers",
]
