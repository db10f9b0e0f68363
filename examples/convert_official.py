"""The official CoPS detectors (github cqylunlun/CoPS) as transformers models, downloaded and verified.

    python examples/convert_official.py visa cops-vitl14-visa     # trained on VisA, for testing on other datasets
    python examples/convert_official.py mvtec cops-vitl14-mvtec   # trained on MVTec AD, for testing on VisA

CLIP ViT-L/14@336px comes from the Hub (openai/clip-vit-large-patch14-336), the checkpoint from the reference
repository (verified by its git blob SHA-1); both are cached. The config records the checkpoint and its test preset.
"""

import sys

from cops_hf.hub import save_detector
from cops_hf.official import load_official

release, output = sys.argv[1:3]
model, processor = load_official(release)
save_detector(model, processor, output)
print(f"saved to {output}")
