"""Inference speed and memory of `CoPSForAnomalyDetection` against a reference-like baseline.

Run from the repository root, e.g.::

    python -m benchmarks.inference                     # official geometry (ViT-L/14, 518 px), CPU fp32
    python -m benchmarks.inference --int8 --onnx       # plus the int8 paths and onnxruntime
    python -m benchmarks.inference --small             # a small geometry, seconds
    python -m benchmarks.inference --device cuda --dtype bfloat16

Measured in one run: the machine's fp32 matmul peak; latency at batch 1 of our model and of the baseline
(interleaved, so both see the same machine load); throughput at the larger batch sizes; peak RSS of one batch-1
inference in a fresh process (CPU) or CUDA max_memory_allocated; FLOPs per image, counted analytically.

The baseline does what the reference implementation does, on the same weights: the text tower runs the full
77-token template (context, ".", EOS, then padding) and reads the EOS position; attention is unfused (explicit
q k^T, softmax, @ v); the last vision block computes the whole original stream; images go one by one. (It shares our
prompt synthesis, prototypes and scoring code, whose cost is small.) The script asserts that it gives our
model's numbers to 1e-5 (fp32).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from cops_hf import CoPSAnomalyDetectionOutput, CoPSConfig, CoPSForAnomalyDetection, CoPSVisionOutput
from cops_hf.quantization import quantize_int8

from .common import current_rss_mib, peak_rss_mib, random_model, reset_peak_rss

PARITY_TOLERANCE = 1e-5
MATMUL_SIZE = 2048


# ---------------------------------------------------------------------------------------------- baseline


def eager_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Unfused attention as the reference computes it: softmax(q k^T * scale + mask) v, materializing the weights."""
    weights = (queries @ keys.transpose(-2, -1)) * queries.shape[-1] ** -0.5
    if mask is not None:
        weights = weights + mask
    return weights.softmax(dim=-1) @ values


def eager_block(
    layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP encoder layer with eager attention; also returns its split-head values for value-value attention."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    split = CoPSForAnomalyDetection._split_heads
    queries = split(attention.q_proj(normed), attention.num_heads)
    keys = split(attention.k_proj(normed), attention.num_heads)
    values = split(attention.v_proj(normed), attention.num_heads)
    hidden = hidden + attention.out_proj(
        CoPSForAnomalyDetection._merge_heads(eager_attention(queries, keys, values, mask))
    )
    return hidden + layer.mlp(layer.layer_norm2(hidden)), values


class ReferenceLikeCoPS(CoPSForAnomalyDetection):
    """Our model with the reference's computation schedule (see the module docstring); shares the weights."""

    @classmethod
    def sharing_weights(cls, model: CoPSForAnomalyDetection) -> ReferenceLikeCoPS:
        """A baseline view of `model`: same modules, parameters and config objects, no copy."""
        baseline = cls.__new__(cls)
        baseline.__dict__.update(model.__dict__)
        return baseline

    @torch.no_grad()
    def dual_path_vision_forward(self, pixel_values: torch.Tensor) -> CoPSVisionOutput:
        vision = self.clip.vision_model
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        grid = tuple(patches.shape[-2:])
        patches = patches.flatten(2).transpose(1, 2)
        class_token = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        hidden = vision.pre_layrnorm(
            torch.cat([class_token, patches], dim=1) + self._interpolated_position_embeddings(grid)
        )
        first_dual_path = len(vision.encoder.layers) - self.config.dpam_layers + 1
        value_stream, layer_features = None, {}
        for index, layer in enumerate(vision.encoder.layers, start=1):
            updated, values = eager_block(layer, hidden)
            if index >= first_dual_path:
                value_value = layer.self_attn.out_proj(self._merge_heads(eager_attention(values, values, values)))
                value_stream = (hidden if value_stream is None else value_stream) + value_value
            hidden = updated
            layer_features[index] = hidden if value_stream is None else value_stream
        projection = self.clip.visual_projection
        patch_embeds = torch.stack(
            [projection(vision.post_layernorm(layer_features[index][:, 1:])) for index in self.config.feature_layers],
            dim=1,
        )
        return CoPSVisionOutput(image_embeds=projection(hidden[:, 0]), patch_embeds=patch_embeds)

    def encode_prompts(self, context_tokens: torch.Tensor) -> torch.Tensor:
        text_model = self.clip.text_model
        text_config = self.config.text_config
        num_prompts, num_context, _ = context_tokens.shape
        length = text_config.max_position_embeddings
        # The template's ids; the context placeholders' ids do not matter (their embeddings are replaced).
        ids = [text_config.bos_token_id, *[0] * num_context, *self.config.prompt_suffix_token_ids]
        ids = [*ids, text_config.eos_token_id, *[0] * (length - len(ids) - 1)]
        end_position = ids.index(text_config.eos_token_id)
        template = text_model.embeddings.token_embedding(torch.tensor(ids, device=context_tokens.device))
        template = template.to(context_tokens.dtype).expand(num_prompts, -1, -1)
        hidden = torch.cat([template[:, :1], context_tokens, template[:, 1 + num_context :]], dim=1)
        hidden = hidden + text_model.embeddings.position_embedding.weight[:length]
        mask = torch.full((length, length), float("-inf"), device=hidden.device, dtype=hidden.dtype).triu(1)
        deep_prompts = self.prompt_synthesizer.deep_prompts.to(hidden.dtype)
        num_deep = deep_prompts.shape[1]
        for index, layer in enumerate(text_model.encoder.layers):
            if 1 <= index <= deep_prompts.shape[0]:
                replaced = deep_prompts[index - 1].expand(num_prompts, -1, -1)
                hidden = torch.cat([hidden[:, :1], replaced, hidden[:, 1 + num_deep :]], dim=1)
            hidden, _ = eager_block(layer, hidden, mask)
        text_embeds = self.clip.text_projection(text_model.final_layer_norm(hidden[:, end_position]))
        return text_embeds / text_embeds.norm(dim=-1, keepdim=True)

    def forward(self, pixel_values: torch.Tensor, vae_noise: torch.Tensor) -> CoPSAnomalyDetectionOutput:
        """Images one by one (batch 1, as the reference tests); scores and maps concatenated over the batch."""
        score_one = super().forward
        outputs = [
            score_one(pixel_values[i : i + 1], vae_noise=vae_noise[i : i + 1]) for i in range(len(pixel_values))
        ]
        return CoPSAnomalyDetectionOutput(
            image_scores=torch.cat([output.image_scores for output in outputs]),
            anomaly_maps=torch.cat([output.anomaly_maps for output in outputs]),
        )


# ---------------------------------------------------------------------------------------------- FLOPs


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    """Multiply-adds of a dense layer, counted as 2 FLOPs each."""
    return 2 * tokens * fan_in * fan_out


def attention_flops(queries: int, keys: int, width: int) -> int:
    """q k^T and (weights) v over all heads: 2 * 2 * queries * keys * width (the softmax is not counted)."""
    return 4 * queries * keys * width


@dataclass
class FlopCount:
    """Matmul FLOPs per image (elementwise work: LayerNorm, softmax, GELU, pooling, blur, is not counted)."""

    vision: int
    text: int
    head: int

    @property
    def total(self) -> int:
        return self.vision + self.text + self.head


def vision_flops(config: CoPSConfig, reference_like: bool) -> int:
    """Patch embedding, the ordinary blocks, the dual-path blocks (value-value attention and its out_proj on top
    of the ordinary block) and the projections. Ours stops the value stream after the last feature layer and
    computes the last block's original stream at the class token only; the reference-like baseline does neither."""
    vision = config.vision_config
    width, inner, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    num_patches = (config.image_size // patch) ** 2
    tokens = num_patches + 1
    num_layers = vision.num_hidden_layers
    first_dual_path = num_layers - config.dpam_layers + 1
    flops = linear_flops(num_patches, vision.num_channels * patch * patch, width)
    for index in range(1, num_layers + 1):
        original_tokens = 1 if index == num_layers and not reference_like else tokens
        flops += linear_flops(original_tokens, width, width) + 2 * linear_flops(tokens, width, width)  # q; k, v
        flops += attention_flops(original_tokens, tokens, width) + linear_flops(original_tokens, width, width)
        flops += linear_flops(original_tokens, width, inner) + linear_flops(original_tokens, inner, width)
        if index >= first_dual_path and (reference_like or index <= max(config.feature_layers)):
            flops += attention_flops(tokens, tokens, width) + linear_flops(tokens, width, width)
    projections = len(config.feature_layers) * num_patches + 1
    return flops + linear_flops(projections, width, config.projection_dim)


def text_flops(config: CoPSConfig, sequence_length: int, num_prompts: int) -> int:
    """`num_prompts` prompts of `sequence_length` tokens through the text tower (full L x L attention, as both
    implementations compute it under the causal mask), plus the EOS projection."""
    text = config.text_config
    width = text.hidden_size
    per_layer = 4 * linear_flops(sequence_length, width, width) + attention_flops(
        sequence_length, sequence_length, width
    )
    per_layer += linear_flops(sequence_length, width, text.intermediate_size) * 2
    return num_prompts * (text.num_hidden_layers * per_layer + linear_flops(1, width, config.projection_dim))


def head_flops(config: CoPSConfig, num_samples: int) -> int:
    """Prototype extractor (one call on both query sets), VAE decoder, distances and patch/image-text scores."""
    dim, num_queries = config.projection_dim, 2 * config.prototype_length
    num_patches = config.patch_grid_size**2
    extractor = linear_flops(num_queries, dim, dim) + 2 * linear_flops(num_patches, dim, dim)
    extractor += attention_flops(num_queries, num_patches, dim) + 3 * linear_flops(num_queries, dim, dim)
    vae = 2 * linear_flops(num_samples, dim, dim)
    scores = linear_flops(num_patches, dim, num_queries) + linear_flops(num_patches + 1, dim, 2)
    return extractor + vae + scores


def flop_counts(config: CoPSConfig, num_samples: int) -> dict[str, FlopCount]:
    """Per-image FLOPs of our model and of the reference-like baseline."""
    num_prompts = 2 * num_samples
    ours_length = 2 + config.num_prompt_tokens + len(config.prompt_suffix_token_ids)
    head = head_flops(config, num_samples)
    return {
        "ours": FlopCount(vision_flops(config, False), text_flops(config, ours_length, num_prompts), head),
        "baseline": FlopCount(
            vision_flops(config, True),
            text_flops(config, config.text_config.max_position_embeddings, num_prompts),
            head,
        ),
    }


# ---------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(function: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call (CUDA work included)."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_runs(function: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of `repeats` calls."""
    return [time_once(function, device) for _ in range(repeats)]


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5, size: int = MATMUL_SIZE) -> float:
    """Best FLOP/s of a large square matmul (`size` x `size`, random data) on this device and dtype."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    best = min(time_once(lambda: left @ right, device) for _ in range(repeats + 1))
    return 2 * size**3 / best


def _memory_probe(geometry: str, int8: bool, results: multiprocessing.Queue) -> None:
    """In a fresh process: RSS after building the model, then the peak RSS of one batch-1 inference."""
    torch.set_num_threads(int(os.environ.get("COPS_BENCH_THREADS", torch.get_num_threads())))
    before = current_rss_mib()
    model = random_model(geometry)
    if int8:
        model = quantize_int8(model, inplace=True)
    loaded, load_peak = current_rss_mib(), peak_rss_mib()
    size = model.config.image_size
    pixel_values = torch.randn(1, 3, size, size)
    noise = torch.randn(1, model.config.vae_samples, model.config.projection_dim)
    reset_peak_rss()
    with torch.inference_mode():
        model(pixel_values, vae_noise=noise)
    results.put({"before": before, "loaded": loaded, "load_peak": load_peak, "inference_peak": peak_rss_mib()})


def measure_peak_rss(geometry: str, int8: bool) -> dict[str, float]:
    """Run `_memory_probe` in a spawned process (so nothing else this script allocated is counted)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    os.environ["COPS_BENCH_THREADS"] = str(torch.get_num_threads())
    process = context.Process(target=_memory_probe, args=(geometry, int8, results))
    process.start()
    reading = results.get()
    process.join()
    return reading


def max_difference(first, second) -> tuple[float, float]:
    """Max |difference| of image scores and of anomaly maps."""
    scores = (first.image_scores.float() - second.image_scores.float()).abs().max().item()
    maps = (first.anomaly_maps.float() - second.anomaly_maps.float()).abs().max().item()
    return scores, maps


@dataclass
class Timing:
    name: str
    batch_size: int
    seconds: list[float]
    flops_per_image: int

    def row(self, peak: float, baseline_seconds: float | None) -> str:
        best, median = min(self.seconds), statistics.median(self.seconds)
        rate = self.flops_per_image * self.batch_size / best
        speedup = f"{baseline_seconds / best:6.2f}x" if baseline_seconds and self.batch_size == 1 else "      -"
        return (
            f"{self.name:<28} {self.batch_size:>5} {best:>9.3f} {median:>9.3f} {self.batch_size / best:>8.3f}"
            f" {rate / 1e9:>8.1f} {100 * rate / peak:>6.1f}% {speedup}  (n={len(self.seconds)})"
        )


def onnx_latencies(
    model: CoPSForAnomalyDetection, pixel_values: torch.Tensor, expected, repeats: int
) -> list[tuple[str, list[float]]]:
    """Export fp32 and int8 (onnxruntime dynamic quantization) graphs, check them against `expected` (PyTorch
    fp32 outputs with the graph's fixed noise) and time them at `pixel_values`' batch size."""
    import onnxruntime

    from cops_hf.export import CoPSOnnxDetector, export_onnx, quantize_onnx_int8

    timings = []
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = export_onnx(model, Path(directory) / "cops.onnx")
        print(f"onnx export: {time.perf_counter() - start:.1f} s, {path.stat().st_size / 2**20:.0f} MiB")
        start = time.perf_counter()
        quantized_path = quantize_onnx_int8(path, Path(directory) / "cops.int8.onnx")
        size_mib = quantized_path.stat().st_size / 2**20
        print(f"onnx int8 quantization: {time.perf_counter() - start:.1f} s, {size_mib:.0f} MiB")
        for name, graph in (("onnxruntime fp32", path), ("onnxruntime int8", quantized_path)):
            detector = CoPSOnnxDetector(graph, session_options=options)
            scores, maps = max_difference(detector(pixel_values=pixel_values), expected)
            print(f"{name}: max |diff| vs PyTorch fp32: scores {scores:.2e}, maps {maps:.2e}")
            cpu = torch.device("cpu")
            timings.append((name, time_runs(partial(detector, pixel_values=pixel_values), repeats, cpu)))
    return timings


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small geometry for quick checks (default: official)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at batch 1 (after one warm-up run)")
    parser.add_argument("--throughput-repeats", type=int, default=1, help="timed runs at larger batch sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--int8", action="store_true", help="also time the int8 CPU path (torch dynamic quant)")
    parser.add_argument("--onnx", action="store_true", help="also export and time onnxruntime fp32 and int8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from cops_hf.export import fixed_vae_noise

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = "small" if args.small else "official"
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if (args.int8 or args.onnx) and (device.type != "cpu" or dtype != torch.float32):
        raise SystemExit("--int8 and --onnx measure the CPU float32 model; drop them or use --device cpu.")
    print(f"geometry {geometry}, device {device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()}")  # fmt: skip

    peak = matmul_peak_flops(device, dtype)
    print(f"matmul peak ({MATMUL_SIZE}^2 {args.dtype}, best of 6): {peak / 1e9:.1f} GFLOP/s")

    model = random_model(geometry)
    config = model.config
    counts = flop_counts(config, config.vae_samples)
    text_length = 2 + config.num_prompt_tokens + len(config.prompt_suffix_token_ids)
    print(f"FLOPs per image (matmuls, analytic), {2 * config.vae_samples} prompts:")
    for name, count in counts.items():
        length = text_length if name == "ours" else config.text_config.max_position_embeddings
        print(f"  {name:<8} vision {count.vision / 1e9:8.1f} G  text ({length} tokens) {count.text / 1e9:6.1f} G  "
              f"head {count.head / 1e9:5.2f} G  total {count.total / 1e9:8.1f} G")  # fmt: skip
    print(f"  ratio baseline/ours: {counts['baseline'].total / counts['ours'].total:.3f}")

    if device.type == "cpu":
        for int8 in (False, True) if args.int8 else (False,):
            memory = measure_peak_rss(geometry, int8)
            print(f"peak RSS, batch 1{' int8' if int8 else ''} (fresh process): {memory['before']:.0f} MiB after "
                  f"imports; {memory['loaded']:.0f} MiB with the random-weight model built (build peak "
                  f"{memory['load_peak']:.0f}); inference peak {memory['inference_peak']:.0f} MiB (weights "
                  f"included, build excluded), "
                  f"{memory['inference_peak'] - memory['loaded']:.0f} MiB above the built model")  # fmt: skip

    model = model.to(device, dtype)
    baseline = ReferenceLikeCoPS.sharing_weights(model)
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(max(args.batch_sizes), 3, size, size, generator=generator).to(device, dtype)
    noise = fixed_vae_noise(model).to(device, dtype)
    flops = counts["ours"].total
    timings: list[Timing] = []
    with torch.inference_mode():
        single, single_noise = images[:1], noise[None]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours = model(single, vae_noise=single_noise)
        if device.type == "cuda":
            print(f"CUDA max_memory_allocated, batch 1: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
        reference = baseline(single, vae_noise=single_noise)
        scores, maps = max_difference(ours, reference)
        print(f"baseline vs ours, max |diff|: scores {scores:.2e}, maps {maps:.2e}")
        if dtype == torch.float32:
            assert max(scores, maps) < PARITY_TOLERANCE, "the baseline does not compute our model's numbers"
        ours_seconds, baseline_seconds = [], []
        for _ in range(args.repeats):
            ours_seconds.append(time_once(lambda: model(single, vae_noise=single_noise), device))
            baseline_seconds.append(time_once(lambda: baseline(single, vae_noise=single_noise), device))
        timings.append(Timing("baseline (reference-like)", 1, baseline_seconds, counts["baseline"].total))
        timings.append(Timing(f"ours {args.dtype}", 1, ours_seconds, flops))
        for batch_size in sorted(set(args.batch_sizes) - {1}):
            batch, batch_noise = images[:batch_size], noise.expand(batch_size, -1, -1)
            seconds = time_runs(partial(model, batch, vae_noise=batch_noise), args.throughput_repeats, device)
            timings.append(Timing(f"ours {args.dtype}", batch_size, seconds, flops))
        if args.int8:
            start = time.perf_counter()
            quantized = quantize_int8(model)
            print(f"torch int8 quantization: {time.perf_counter() - start:.1f} s")
            int8_outputs = quantized(single, vae_noise=single_noise)
            scores, maps = max_difference(int8_outputs, ours)
            print(f"torch int8 vs fp32, max |diff|: scores {scores:.2e}, maps {maps:.2e}")
            seconds = time_runs(partial(quantized, single, vae_noise=single_noise), args.repeats, device)
            timings.append(Timing("ours int8 (torch dynamic)", 1, seconds, flops))
            del quantized
    if args.onnx:
        for name, seconds in onnx_latencies(model, single, ours, args.repeats):
            timings.append(Timing(name, 1, seconds, flops))

    base = min(timings[0].seconds)
    print(f"\n{'variant':<28} {'batch':>5} {'best s':>9} {'median s':>9} {'img/s':>8} {'GFLOP/s':>8} {'%peak':>7}"
          f" {'vs base':>7}  (best of n; GFLOP/s counts matmul FLOPs, int8 as if fp32)")  # fmt: skip
    for timing in timings:
        print(timing.row(peak, base))
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
