"""Share a CoPS model on the Hub: weights, processor, remote code and a model card in one commit.

    hf auth login   # a token with write access
    python examples/push.py MODEL_DIR your-name/cops-visa [RESULTS_JSON]

RESULTS_JSON is what `cops-hf evaluate` (metrics.json) or `cops-hf benchmark` (benchmark.json) wrote for this model;
without it the card says that no evaluation was recorded. The card's base model and training dataset come from the
model's own config.
"""

import json
import sys
from pathlib import Path

from cops_hf.hub import evaluation_for_card, push_cops_to_hub

model_dir, repo_id, *results = sys.argv[1:]
evaluation = evaluation_for_card(json.loads(Path(results[0]).read_text())) if results else None
commit = push_cops_to_hub(model_dir, repo_id, evaluation=evaluation)
print(f"Pushed: {commit.commit_url}")
print("Without cops_hf:")
print(f'  pipeline("anomaly-detection", model="{repo_id}", revision="{commit.oid}", trust_remote_code=True)')
