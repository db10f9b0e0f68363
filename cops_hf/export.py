"""ONNX export of the whole CoPS inference, and an onnxruntime runner.

The exported graph is `pixel_values [batch, 3, H, W] -> image_scores [batch], anomaly_maps [batch, H, W]`: vision
tower with dual-path attention, prototypes, prompt synthesis, text tower, scoring, upsampling and Gaussian
smoothing, all in one graph with a dynamic batch axis. The VAE prior samples that the model draws at random are
FIXED at export (seeded) and stored in the graph as a constant, shared by every image; the PyTorch model gives the
same numbers when passed the same noise (`fixed_vae_noise(...).expand(batch, -1, -1)` as `vae_noise`).

The fields a runner needs (input size, normalization, thresholds, the noise's seed and sample count) are stored
as JSON in the ONNX metadata under `ONNX_METADATA_KEY`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .image_utils import ImageLike
from .modeling_cops import CoPSAnomalyDetectionOutput, CoPSForAnomalyDetection
from .processing_cops import CoPSImageProcessor, CoPSProcessor

ONNX_METADATA_KEY = "cops_config"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("image_scores", "anomaly_maps")
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(14, 21)
"""Opsets the graph exports to: 14 adds the fused attention it needs, 20 is the TorchScript exporter's newest."""


def fixed_vae_noise(model: CoPSForAnomalyDetection, num_samples: int | None = None, seed: int = 0) -> torch.Tensor:
    """The seeded VAE prior samples `[S, D]` that an exported graph holds (S defaults to `config.vae_samples`).

    The same samples as `model.seeded_prior_noise`, so with the same seed the graph, the pipeline and the
    evaluator agree.
    """
    return model.seeded_prior_noise(1, seed, num_samples)[0]


class CoPSInferenceGraph(nn.Module):
    """The model's inference with fixed VAE noise, as one traceable module: pixel_values -> (scores, maps)."""

    def __init__(self, model: CoPSForAnomalyDetection, vae_noise: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("vae_noise", vae_noise)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, 3, H, W]` -> `(image_scores [B], anomaly_maps [B, H, W])`, every image with the same noise."""
        noise = self.vae_noise.expand(pixel_values.shape[0], -1, -1)
        outputs = self.model(pixel_values=pixel_values, vae_noise=noise, return_dict=True)
        return outputs.image_scores, outputs.anomaly_maps


def export_metadata(
    model: CoPSForAnomalyDetection, vae_samples: int, seed: int, image_processor: CoPSImageProcessor | None = None
) -> dict[str, Any]:
    """The JSON-able fields stored in the ONNX metadata of an exported model."""
    image_processor = image_processor or CoPSImageProcessor(size=model.config.image_size)
    return {
        "image_size": model.config.image_size,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "image_threshold": model.config.image_threshold,
        "pixel_threshold": model.config.pixel_threshold,
        "vae_samples": vae_samples,
        "seed": seed,
        "cops_hf_version": __version__,
    }


def _write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    graph.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(metadata))
    onnx.save(graph, str(path))


def export_onnx(
    model: CoPSForAnomalyDetection,
    output: str | os.PathLike,
    vae_samples: int | None = None,
    seed: int = 0,
    opset: int | None = None,
    image_processor: CoPSImageProcessor | None = None,
) -> Path:
    """Export the whole inference of `model` to one float32 ONNX graph with a dynamic batch axis.

    Args:
        model: the model to export; it is converted IN PLACE to float32 on CPU and eval mode.
        output: path of the `.onnx` file to write.
        vae_samples: VAE prior samples S baked into the graph (default `config.vae_samples`).
        seed: seed of those samples (see `fixed_vae_noise`).
        opset: ONNX opset version (default `DEFAULT_OPSET`), one of `SUPPORTED_OPSETS`.
        image_processor: the preprocessing whose normalization is recorded in the metadata (default: CLIP's).

    Returns:
        The path written. Load it with `CoPSOnnxDetector`.
    """
    opset = opset or DEFAULT_OPSET
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"ONNX opset {opset} is not supported: use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            f"(default {DEFAULT_OPSET})."
        )
    if vae_samples is not None and vae_samples < 1:
        raise ValueError(f"vae_samples must be >= 1 (the graph averages over the VAE samples), got {vae_samples}.")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    noise = fixed_vae_noise(model, vae_samples, seed)
    size = model.config.image_size
    # Traced with a batch of 2 so that no size-1 broadcasting is baked in for the batch axis.
    example = torch.zeros(2, model.config.vision_config.num_channels, size, size)
    dynamic_batch = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # The input checks and the fixed image size are Python-level branches: baking them into the trace is
        # intended (only the batch axis is dynamic), so the tracer's warnings about them are noise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            CoPSInferenceGraph(model, noise),
            (example,),
            str(output),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: dynamic_batch for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=opset,
            dynamo=False,
        )
    _write_metadata(output, export_metadata(model, noise.shape[0], seed, image_processor))
    return output


def quantize_onnx_int8(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Dynamic int8 quantization (onnxruntime) of the MatMul weights of an exported graph; metadata is kept."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = Path(output)
    quantize_dynamic(str(source), str(output), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    metadata = {prop.key: prop.value for prop in onnx.load(str(source), load_external_data=False).metadata_props}
    _write_metadata(output, json.loads(metadata[ONNX_METADATA_KEY]))
    return output


class CoPSOnnxDetector:
    """Runs an exported CoPS graph with onnxruntime; outputs match `CoPSForAnomalyDetection` with the same noise.

    Args:
        path: the `.onnx` file written by `export_onnx` (or `cops-hf export --format onnx`).
        processor: preprocessing for `images`; by default a `CoPSProcessor` with the size and normalization
            recorded in the graph's metadata.
        providers: onnxruntime execution providers (default CPU).
        session_options: onnxruntime session options (threads, optimization level).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        processor: CoPSProcessor | None = None,
        providers: list[str] | None = None,
        session_options: Any | None = None,
    ) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
        )
        custom = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in custom:
            raise ValueError(f"'{path}' has no '{ONNX_METADATA_KEY}' metadata; export it with cops_hf.export_onnx.")
        self.metadata: dict[str, Any] = json.loads(custom[ONNX_METADATA_KEY])
        self.processor = processor or CoPSProcessor(
            CoPSImageProcessor(
                size=self.metadata["image_size"],
                image_mean=self.metadata["image_mean"],
                image_std=self.metadata["image_std"],
            )
        )

    @property
    def image_size(self) -> int:
        """Square input side in pixels the graph was exported for."""
        return int(self.metadata["image_size"])

    def __call__(
        self,
        pixel_values: torch.Tensor | np.ndarray | None = None,
        images: ImageLike | list[ImageLike] | None = None,
    ) -> CoPSAnomalyDetectionOutput:
        """Score a batch given as `pixel_values` `[B, 3, H, W]` (from the processor) or as raw `images`.

        Returns:
            A `CoPSAnomalyDetectionOutput` with `image_scores` `[B]` and `anomaly_maps` `[B, H, W]` (torch
            tensors), ready for `processor.post_process_anomaly_detection`.
        """
        if (pixel_values is None) == (images is None):
            raise ValueError("Pass exactly one of pixel_values or images.")
        if images is not None:
            pixel_values = self.processor(images=images)["pixel_values"]
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().numpy()
        array = np.ascontiguousarray(pixel_values, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [batch, {', '.join(map(str, expected))}], got {list(array.shape)}."
            )
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return CoPSAnomalyDetectionOutput(image_scores=torch.from_numpy(scores), anomaly_maps=torch.from_numpy(maps))

    def detect(self, images: ImageLike | list[ImageLike]) -> list[dict[str, Any]]:
        """Per image: `pred_score` and `anomaly_map` at the original size.

        `pred_label`/`pred_mask` are added when the graph's metadata holds calibrated thresholds (see
        `CoPSProcessor.post_process_anomaly_detection`).
        """
        inputs = self.processor(images=images)
        outputs = self(pixel_values=inputs["pixel_values"])
        return self.processor.post_process_anomaly_detection(
            outputs,
            target_sizes=inputs["original_sizes"],
            threshold=self.metadata["pixel_threshold"],
            image_threshold=self.metadata["image_threshold"],
        )


__all__ = [
    "CoPSInferenceGraph",
    "CoPSOnnxDetector",
    "ONNX_METADATA_KEY",
    "export_metadata",
    "export_onnx",
    "fixed_vae_noise",
    "quantize_onnx_int8",
]
