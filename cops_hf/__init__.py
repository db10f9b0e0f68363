"""cops-hf: CoPS zero-shot anomaly detection on transformers' CLIP."""

__version__ = "0.1.0"
