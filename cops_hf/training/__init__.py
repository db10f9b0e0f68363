"""Training CoPS on an auxiliary dataset with Accelerate.

The frozen CLIP runs in eval mode without gradients; only the CoPS modules (prompt context, deep prompts, state
prototypes, class-token VAE) learn, with the reference optimizer (Adam, lr 1e-3, betas (0.5, 0.999)). The same
code runs in one process, under `torchrun --nproc_per_node N` (CPU, gloo) and under `accelerate launch` (GPUs).

Typical use::

    from cops_hf.training import TrainingConfig, cops_model_for_training, load_training_dataset, processor_for
    from cops_hf.training import train_cops

    model = cops_model_for_training("openai/clip-vit-large-patch14-336", preset="visa")
    dataset = load_training_dataset("/data/VisA")   # the labelled split: "test" for VisA, as the reference trains
    train_cops(model, processor_for(model), dataset, TrainingConfig(output_dir="runs/visa"))

Feature cache: the vision tower is frozen and the data is not augmented, so its outputs (`CoPSVisionOutput`) are
exact per image. They are computed during the first epoch and reused afterwards. Each image costs
`(1 + F * N) * D` floats (F feature layers, N patches, D joint width) plus its binary mask: for ViT-L/14 at 518 px,
`(1 + 1369) * 768 * 4` bytes ~= 4.2 MB in fp32 (half in bf16/fp16), so VisA's ~10k training images need ~42 GB.
Keep that in memory only when it fits; otherwise set `cache_dir` (safetensors files on disk, memory-mapped when
read) or turn the cache off (`cache_vision_features=False`, `--no-cache`).

Modules: `config` (`TrainingConfig`), `data` (samples, collate, epoch batches), `feature_cache`, `checkpointing`
and `trainer` (`CoPSTrainer`, `train_cops`). Everything is importable from `cops_hf.training`.
"""

from ..random_towers import RANDOM_CLIP_CONFIGS, random_clip_model
from .checkpointing import CHECKPOINTS_DIRNAME, CLIP_PREFIX, cops_state_dict, list_checkpoints
from .config import MIXED_PRECISION_MODES, TrainingConfig
from .data import TrainingSamples, collate_samples, epoch_batches, load_training_dataset
from .feature_cache import VisionFeatureCache
from .trainer import (
    LOSS_TERMS,
    TRAIN_LOG_FILENAME,
    CoPSTrainer,
    TrainingResult,
    cops_model_for_training,
    processor_for,
    train_cops,
)

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "CLIP_PREFIX",
    "LOSS_TERMS",
    "MIXED_PRECISION_MODES",
    "RANDOM_CLIP_CONFIGS",
    "TRAIN_LOG_FILENAME",
    "CoPSTrainer",
    "TrainingConfig",
    "TrainingResult",
    "TrainingSamples",
    "VisionFeatureCache",
    "collate_samples",
    "cops_model_for_training",
    "cops_state_dict",
    "epoch_batches",
    "list_checkpoints",
    "load_training_dataset",
    "processor_for",
    "random_clip_model",
    "train_cops",
]
