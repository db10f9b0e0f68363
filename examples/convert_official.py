"""Convert the official release (OpenAI CLIP ViT-L/14@336 + a CoPS checkpoint) into a transformers model.

    python examples/convert_official.py ViT-L-14-336px.pt results/models/visa/epoch_10.pth cops-vitl14-visa

The checkpoint trained on VisA is meant for testing on other datasets (general test preset); the one trained on
MVTec AD is tested on VisA, so the VisA test preset is applied to it.
"""

import sys

from cops_hf import CoPSImageProcessor, CoPSProcessor
from cops_hf.conversion import convert_original_checkpoint

clip_file, cops_file, output = sys.argv[1:4]
trained_on_mvtec = "mvtec" in cops_file.lower()
model = convert_original_checkpoint(clip_file, cops_file, image_size=518)
model.config = model.config.with_preset(
    test_dataset="visa" if trained_on_mvtec else "general", train_dataset="mvtec" if trained_on_mvtec else "visa"
)
model.save_pretrained(output)
CoPSProcessor(CoPSImageProcessor(size=518)).save_pretrained(output)
print(f"saved to {output}")
