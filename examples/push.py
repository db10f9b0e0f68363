"""Share a CoPS model on the Hub: weights, processor, remote code and a model card in one commit.

    hf auth login   # a token with write access
    python examples/push.py MODEL_DIR your-name/cops-visa
"""

import sys

from cops_hf.hub import push_cops_to_hub

model_dir, repo_id = sys.argv[1:]
commit = push_cops_to_hub(
    model_dir,
    repo_id,
    training_dataset="mvtec",
    evaluation={"VisA": {"I-AUROC": 0.90, "P-AUROC": 0.95}},  # your own zero-shot results, as fractions
)
print(f"Pushed: {commit.commit_url}")
print("Without cops_hf:")
print(f'  pipeline("anomaly-detection", model="{repo_id}", revision="{commit.oid}", trust_remote_code=True)')
