"""Evaluate a CoPS model on a dataset in meta.json layout with the reference's protocol for that dataset.

    python examples/evaluate.py MODEL_DIR /data/mvtec mvtec results/mvtec
"""

import sys

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.evaluation.evaluator import evaluate_dataset

model_name, data_root, dataset_name, output = sys.argv[1:5]
model = CoPSForAnomalyDetection.from_pretrained(model_name)
processor = CoPSProcessor.from_pretrained(model_name)
result = evaluate_dataset(model, processor, data_root, test_preset=dataset_name, output_dir=output)
print(result.report.format_table())
