"""Score images with a CoPS model and save heatmap overlays.

    python examples/infer.py MODEL_DIR_OR_HUB_ID image1.png image2.png
"""

import sys

from transformers import pipeline

import cops_hf  # noqa: F401  (registers the "anomaly-detection" task)
from cops_hf.evaluation.plots import overlay
from cops_hf.processing_cops import load_image

model_name, *images = sys.argv[1:]
detector = pipeline("anomaly-detection", model=model_name)
for path, result in zip(images, detector(images, batch_size=4), strict=True):
    print(f"{path}: score {result['score']:.3f} {result.get('label', '')}")
    overlay(load_image(path), result["anomaly_map"], value_range=(0.0, 1.0)).save(f"{path}.overlay.png")
