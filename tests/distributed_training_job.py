"""Job for `torchrun --nproc_per_node 2` (CPU, gloo) in tests/test_training.py; not a test module itself.

Usage: `torchrun --nproc_per_node 2 tests/distributed_training_job.py DATA_DIR OUTPUT_DIR`. Every process trains the
same tiny CoPS and then writes its own CoPS weights to `OUTPUT_DIR/weights-process<RANK>.safetensors`, so the test
can check that all processes end with identical weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from cops_hf.training import (
    TrainingConfig,
    cops_model_for_training,
    cops_state_dict,
    load_training_dataset,
    processor_for,
    random_clip_model,
    train_cops,
)

IMAGE_SIZE = 56


def main(data_dir: str, output_dir: str) -> None:
    model = cops_model_for_training(random_clip_model("tiny", seed=0), image_size=IMAGE_SIZE)
    config = TrainingConfig(output_dir=output_dir, num_epochs=3, batch_size=4, progress_bar=False)
    result = train_cops(model, processor_for(model), load_training_dataset(data_dir), config)
    state = PartialState()
    weights = {name: tensor.contiguous() for name, tensor in cops_state_dict(result.model).items()}
    save_file(weights, str(Path(output_dir) / f"weights-process{state.process_index}.safetensors"))
    if state.is_main_process:
        print(f"distributed_type={state.distributed_type.value} num_processes={state.num_processes}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
