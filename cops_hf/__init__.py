"""cops-hf: CoPS zero-shot anomaly detection on transformers' CLIP.

Importing the package registers `CoPSConfig`, `CoPSForAnomalyDetection` and `CoPSProcessor` with transformers'
Auto classes and the "anomaly-detection" pipeline task, and registers them for the Auto classes' remote code: every
`save_pretrained` folder and `push_to_hub` repository carries an `auto_map` and the code files, so it also loads
with `trust_remote_code=True` where cops_hf is not installed. Where it is installed, its own classes win over those
copies (transformers prefers explicitly registered classes), so a copy never runs stale code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_cops import TEST_DATASET_PRESETS, TRAIN_DATASET_PRESETS, CoPSConfig
from .modeling_cops import CoPSAnomalyDetectionOutput, CoPSForAnomalyDetection, CoPSVisionOutput
from .pipeline_anomaly_detection import AnomalyDetectionPipeline, register_pipeline
from .processing_cops import CoPSImageProcessor, CoPSProcessor, ImageLoadError

__version__ = "0.1.0"

AutoConfig.register(CoPSConfig.model_type, CoPSConfig, exist_ok=True)
AutoModel.register(CoPSConfig, CoPSForAnomalyDetection, exist_ok=True)
AutoImageProcessor.register(CoPSConfig, slow_image_processor_class=CoPSImageProcessor, exist_ok=True)
AutoProcessor.register(CoPSConfig, CoPSProcessor, exist_ok=True)
register_pipeline()
CoPSConfig.register_for_auto_class()
CoPSForAnomalyDetection.register_for_auto_class("AutoModel")
CoPSImageProcessor.register_for_auto_class("AutoImageProcessor")
CoPSProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "TEST_DATASET_PRESETS",
    "AnomalyDetectionPipeline",
    "TRAIN_DATASET_PRESETS",
    "CoPSAnomalyDetectionOutput",
    "CoPSConfig",
    "CoPSForAnomalyDetection",
    "CoPSImageProcessor",
    "CoPSProcessor",
    "CoPSVisionOutput",
    "ImageLoadError",
]
