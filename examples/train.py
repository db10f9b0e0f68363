"""Train CoPS on VisA (the reference's setup for testing on MVTec AD) and save a loadable model.

    python examples/train.py /data/VisA runs/visa               # one process
    accelerate launch examples/train.py /data/VisA runs/visa    # several GPUs; `torchrun` works too

The dataset root needs a meta.json (`cops-hf data prepare visa /data/VisA` writes it). Training reads its labelled
split (`test`: normal and anomalous images with masks), as the reference does. Interrupted? Run it again: it
resumes from the last complete epoch checkpoint.
"""

import sys

from cops_hf.training import (
    TrainingConfig,
    cops_model_for_training,
    load_training_dataset,
    processor_for,
    train_cops,
)

data_root, output_dir = sys.argv[1], sys.argv[2]
model = cops_model_for_training("openai/clip-vit-large-patch14-336", preset="visa", image_size=518)
config = TrainingConfig(
    output_dir=output_dir,
    num_epochs=10,  # the reference: 10 epochs on VisA, 5 on MVTec AD
    mixed_precision="bf16",
    cache_dir=f"{output_dir}/cache",  # ~4.2 MB per image in fp32 (half in bf16): VisA does not fit in memory
    resume=True,
)
result = train_cops(model, processor_for(model), load_training_dataset(data_root), config)
print(f"final loss {result.history[-1]['loss']:.4f}" if result.history else "already trained", "->", output_dir)
