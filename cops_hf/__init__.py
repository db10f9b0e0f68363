"""cops-hf: CoPS zero-shot anomaly detection on transformers' CLIP.

Importing the package registers `CoPSConfig`, `CoPSForAnomalyDetection` and `CoPSProcessor` with transformers'
Auto classes and the "anomaly-detection" pipeline task.
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
