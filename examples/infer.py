"""Score images, folders or glob patterns with a CoPS model: scores.csv, heatmap overlays and masks in OUTPUT.

    python examples/infer.py MODEL_DIR_OR_HUB_ID OUTPUT image1.png photos/ "more/*.jpg"
"""

import sys

from cops_hf.predict import expand_image_sources, load_detector, write_predictions

model_name, output, *sources = sys.argv[1:]
detector = load_detector(model_name)  # the "anomaly-detection" pipeline, on a GPU when there is one
summary = write_predictions(detector, expand_image_sources(sources), output, batch_size=4)
print(f"{summary.num_scored} images scored; see {summary.table_path}")
