"""The GPU check: speed, memory and precision of the CUDA paths at the official geometry, in one run.

`benchmarks/gpu_check.sh` runs the GPU tests and then each step below in its own process under a timeout; every
step merges its results into OUT/gpu_check.json and `report` renders OUT/gpu_check.md. By hand, from the
repository root::

    python -m benchmarks.gpu_check inference --out gpu_check_out   # latency, throughput, memory, attention kernels
    python -m benchmarks.gpu_check precision --out gpu_check_out   # bf16 / fp16 against fp32 on 64 synthetic images
    python -m benchmarks.gpu_check training --out gpu_check_out    # mixed-precision training steps, feature cache
    python -m benchmarks.gpu_check onnx --out gpu_check_out        # onnxruntime's CUDA execution provider
    python -m benchmarks.gpu_check report --out gpu_check_out      # gpu_check.md from gpu_check.json

`--device cpu --small` runs the same steps on the CPU at the small geometry: a quick check of the script itself,
whose numbers are CPU numbers.

Timing: inputs already on the device, `torch.inference_mode`, warm-up calls first, then the wall-clock time of each
call with the device synchronized before and after (median and best). Peak memory of a configuration: the weights
of the model it runs plus the most `torch.cuda.max_memory_allocated` rose above what was allocated before its timed
calls (the CUDA context and the caching allocator's reserve are not counted). Our model and the reference-like
baseline (`benchmarks/inference.py`) share the weights and run on the same GPU in the same process.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

RESULTS_FILENAME = "gpu_check.json"
TABLE_FILENAME = "gpu_check.md"
STEPS_FILENAME = "steps.tsv"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_DTYPES = ("bfloat16", "float16")
# Issue 15's targets on the H200.
TARGET_BF16_LATENCY_MS = 50.0
TARGET_IMAGES_PER_SECOND = 150.0
TARGET_SCORE_DIFFERENCE = 5e-3
GPU_MATMUL_SIZE = 8192
CPU_MATMUL_SIZE = 1024
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "sdpa")


# ---------------------------------------------------------------------------------------------- results file


def load_results(out: Path) -> dict[str, Any]:
    """The results gathered so far (an empty dict before the first step)."""
    path = out / RESULTS_FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}


def save_step(out: Path, step: str, results: dict[str, Any]) -> None:
    """Merge one step's results into OUT/gpu_check.json (written to a temporary file, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    merged = {**load_results(out), step: results}
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as handle:
        json.dump(merged, handle, indent=2)
    os.replace(handle.name, out / RESULTS_FILENAME)


# ---------------------------------------------------------------------------------------------- helpers


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device's name and size."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
            compute_capability=f"{properties.major}.{properties.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def timed_calls(
    function: Callable[[], object], device: torch.device, warmup: int, repeats: int, weights: int
) -> tuple[list[float], float | None]:
    """Seconds of `repeats` calls after `warmup` untimed ones, and the peak memory in MiB (CUDA only): `weights`
    plus the rise of `max_memory_allocated` above the memory allocated before the timed calls."""
    from .inference import synchronize, time_runs

    for _ in range(warmup):
        function()
    synchronize(device)
    if device.type != "cuda":
        return time_runs(function, repeats, device), None
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = time_runs(function, repeats, device)
    return seconds, (torch.cuda.max_memory_allocated(device) - before + weights) / 2**20


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, for a results file."""
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def half_copy(model: torch.nn.Module, dtype_name: str) -> torch.nn.Module:
    """`model` itself for float32, else a converted copy."""
    return model if dtype_name == "float32" else copy.deepcopy(model).to(DTYPES[dtype_name])


# ---------------------------------------------------------------------------------------------- attention kernels


def attention_kernels(model, pixel_values: torch.Tensor, noise: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Which attention kernels one forward launches, and whether the forward runs with only fused SDPA backends.

    The profiler lists the CUDA kernels of one batch-1 forward (attention ones by name). Then the forward runs
    under `sdpa_kernel` restricted to the fused backends (flash, memory-efficient, cuDNN): SDPA raises instead of
    falling back to the unfused math path, so success shows that no attention call needs it. In half precision
    the vision tower (all of its ordinary and value-value attention) is also run with flash alone.
    """
    from torch.autograd import DeviceType
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from .inference import max_difference, synchronize

    result: dict[str, Any] = {}
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        reference = model(pixel_values, vae_noise=noise)
        synchronize(device)
    launches = Counter(event.name for event in profiler.events() if event.device_type == DeviceType.CUDA)
    attention = {
        name: count for name, count in launches.items() if any(w in name.lower() for w in ATTENTION_KERNEL_WORDS)
    }
    result["attention_kernels"] = {name[:120]: count for name, count in sorted(attention.items())}
    result["softmax_kernel_launches"] = sum(count for name, count in launches.items() if "softmax" in name.lower())
    result["kernel_launches"] = sum(launches.values())

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            restricted = model(pixel_values, vae_noise=noise)
        scores, maps = max_difference(restricted, reference)
        result["fused_backends_only"] = {"ran": True, "max_score_difference": scores, "max_map_difference": maps}
    except RuntimeError as error:
        result["fused_backends_only"] = {"ran": False, "error": first_line(error)}
    if pixel_values.dtype in (torch.bfloat16, torch.float16):
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                model.dual_path_vision_forward(pixel_values)
            result["vision_on_flash_only"] = {"ran": True}
        except RuntimeError as error:
            result["vision_on_flash_only"] = {"ran": False, "error": first_line(error)}
    return result


# ---------------------------------------------------------------------------------------------- steps


def run_inference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Latency, throughput and peak memory of ours and the baseline in each dtype; attention kernels."""
    from cops_hf.export import fixed_vae_noise

    from .common import random_model
    from .inference import ReferenceLikeCoPS, flop_counts, matmul_peak_flops, max_difference

    matmul_size = GPU_MATMUL_SIZE if device.type == "cuda" else CPU_MATMUL_SIZE
    matmul_peaks = {name: matmul_peak_flops(device, DTYPES[name], size=matmul_size) for name in args.dtypes}
    start = time.perf_counter()
    model32 = random_model(args.geometry, device=device)
    build_seconds = time.perf_counter() - start
    config = model32.config
    counts = flop_counts(config, config.vae_samples)
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(max(args.batch_sizes), 3, size, size, generator=generator).to(device)
    noise = fixed_vae_noise(model32).to(device)

    runs, parity, kernels = [], {}, {}
    for dtype_name in args.dtypes:
        model = half_copy(model32, dtype_name)
        baseline = ReferenceLikeCoPS.sharing_weights(model)
        weights = weight_bytes(model)
        batch_images, batch_noise = images.to(DTYPES[dtype_name]), noise.to(DTYPES[dtype_name])
        with torch.inference_mode():
            single, single_noise = batch_images[:1], batch_noise[None]
            scores, maps = max_difference(
                model(single, vae_noise=single_noise), baseline(single, vae_noise=single_noise)
            )
            parity[dtype_name] = {"max_score_difference": scores, "max_map_difference": maps}
            for batch_size in args.batch_sizes:
                inputs = (batch_images[:batch_size],)
                options = {"vae_noise": batch_noise.expand(batch_size, -1, -1)}
                warmup, repeats = (args.warmup, args.repeats) if batch_size == 1 else (1, args.throughput_repeats)
                variants = [("ours", model, counts["ours"].total)]
                if batch_size in args.baseline_batch_sizes:
                    variants.append(("baseline", baseline, counts["baseline"].total))
                for variant, scorer, flops in variants:
                    call = partial(scorer, *inputs, **options)
                    variant_repeats = repeats if variant == "ours" else max(2, repeats // 2)
                    seconds, peak = timed_calls(call, device, warmup, variant_repeats, weights)
                    median = sorted(seconds)[len(seconds) // 2]
                    runs.append({
                        "variant": variant,
                        "dtype": dtype_name,
                        "batch_size": batch_size,
                        "median_ms": 1e3 * median,
                        "best_ms": 1e3 * min(seconds),
                        "images_per_second": batch_size / median,
                        "tflops": flops * batch_size / median / 1e12,
                        "peak_mib": peak,
                        "weights_mib": weights / 2**20,
                        "repeats": len(seconds),
                    })  # fmt: skip
            if device.type == "cuda":
                try:
                    kernels[dtype_name] = attention_kernels(model, single, single_noise, device)
                except Exception as error:  # the profiler may be unavailable; keep the timings
                    kernels[dtype_name] = {"error": first_line(error)}
        del model, baseline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "environment": environment(device),
        "geometry": args.geometry,
        "image_size": size,
        "model_build_seconds": build_seconds,
        "flops_per_image": {name: count.total for name, count in counts.items()},
        "matmul_peak_tflops": {name: peak / 1e12 for name, peak in matmul_peaks.items()},
        "matmul_size": matmul_size,
        "baseline_parity": parity,
        "runs": runs,
        "attention": kernels,
    }


def run_precision(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """bfloat16 and float16 against float32 (TF32 off) on synthetic images with defects."""
    from cops_hf import CoPSImageProcessor
    from cops_hf.export import fixed_vae_noise

    from .common import make_synthetic_images, random_model
    from .int8_accuracy import accuracy_cost, score_dataset

    torch.backends.cudnn.allow_tf32 = False  # the float32 reference is plain float32 (matmuls are by default)
    model32 = random_model(args.geometry, device=device)
    size = model32.config.image_size
    start = time.perf_counter()
    images, masks, labels = make_synthetic_images(args.num_images, size, seed=0)
    pixel_values = CoPSImageProcessor(size=size)(list(images))["pixel_values"]
    render_seconds = time.perf_counter() - start
    noise = fixed_vae_noise(model32).to(device)

    def scorer(model: torch.nn.Module, dtype: torch.dtype) -> Callable:
        def score_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                outputs = model(batch.to(device, dtype), vae_noise=noise.to(dtype).expand(len(batch), -1, -1))
            return outputs.image_scores, outputs.anomaly_maps

        return score_batch

    reference = score_dataset(scorer(model32, torch.float32), pixel_values, args.precision_batch_size)
    costs = {}
    for dtype_name in (name for name in args.dtypes if name != "float32"):
        model = half_copy(model32, dtype_name)
        candidate = score_dataset(scorer(model, DTYPES[dtype_name]), pixel_values, args.precision_batch_size)
        costs[dtype_name] = accuracy_cost(reference, candidate, labels, masks)
        del model
    return {
        "num_images": args.num_images,
        "anomalous_images": int(labels.sum()),
        "image_size": size,
        "render_seconds": render_seconds,
        "score_spread_float32": float(reference[0].std()),
        "against_float32": costs,
    }


def run_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A few epochs with mixed precision on synthetic images with masks: finite, falling loss; cached features."""
    from cops_hf import CoPSForAnomalyDetection
    from cops_hf.data import make_synthetic_dataset
    from cops_hf.training import CoPSTrainer, TrainingConfig, load_training_dataset, processor_for

    from .common import benchmark_config

    with tempfile.TemporaryDirectory() as directory:
        size = benchmark_config(args.geometry).image_size
        root = make_synthetic_dataset(
            Path(directory) / "data", test_categories=[], images_per_category=args.train_images, image_size=size
        )
        dataset = load_training_dataset(root)
        torch.manual_seed(0)
        with torch.device(device):
            model = CoPSForAnomalyDetection(benchmark_config(args.geometry))  # transformers' own initialization
        config = TrainingConfig(
            output_dir=Path(directory) / "run",
            num_epochs=args.epochs,
            batch_size=args.train_batch_size,
            mixed_precision=args.mixed_precision,
            progress_bar=False,
            use_cpu=device.type == "cpu",
        )
        trainer = CoPSTrainer(model, processor_for(model), dataset, config)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    losses = [record["loss"] for record in result.history]
    return {
        "device": str(trainer.accelerator.device),
        "mixed_precision": args.mixed_precision,
        "images": len(dataset),
        "batch_size": args.train_batch_size,
        "optimizer_steps": trainer.global_step,
        "epochs": [
            {key: record[key] for key in ("epoch", "loss", "seconds", "images_per_second", "cached_features")}
            for record in result.history
        ],
        "loss_finite": all(math.isfinite(loss) for loss in losses),
        "loss_decreasing": all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)),
        "seconds_with_saving": seconds,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "feature_cache": "computed on the training device in epoch 1, kept in CPU memory, moved back per batch",
    }


def run_onnx(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """onnxruntime with its CUDA execution provider, when the installed onnxruntime has one."""
    try:
        import onnxruntime
    except ImportError as error:
        return {"skipped": f"onnxruntime does not import ({first_line(error)})"}
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {
            "skipped": f"onnxruntime {onnxruntime.__version__} offers {providers}, no CUDAExecutionProvider "
            "(that needs the onnxruntime-gpu package)"
        }
    from cops_hf.export import CoPSOnnxDetector, export_onnx, fixed_vae_noise

    from .common import random_model
    from .inference import max_difference, time_runs

    model = random_model(args.geometry)
    size = model.config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = export_onnx(model, Path(directory) / "cops.onnx")
        export_seconds = time.perf_counter() - start
        detector = CoPSOnnxDetector(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        outputs = detector(pixel_values=pixel_values)
        model = model.to(device)
        with torch.inference_mode():
            expected = model(pixel_values.to(device), vae_noise=fixed_vae_noise(model)[None].to(device))
        scores, maps = max_difference(outputs, expected)
        for _ in range(args.warmup):
            detector(pixel_values=pixel_values)
        seconds = time_runs(partial(detector, pixel_values=pixel_values), args.repeats, torch.device("cpu"))
    median = sorted(seconds)[len(seconds) // 2]
    return {
        "session_providers": detector.session.get_providers(),
        "export_seconds": export_seconds,
        "max_score_difference_vs_torch_float32": scores,
        "max_map_difference_vs_torch_float32": maps,
        "batch1_median_ms": 1e3 * median,
        "batch1_best_ms": 1e3 * min(seconds),
        "note": "float32 graph; the input is copied from host memory on every call",
    }


# ---------------------------------------------------------------------------------------------- report


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _steps(out: Path) -> list[dict[str, str]]:
    path = out / STEPS_FILENAME
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, fieldnames=["step", "exit", "seconds", "timeout"], delimiter="\t"))


def target_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, met) for issue 15's three targets, from what was measured."""
    rows = []
    runs = results.get("inference", {}).get("runs", [])
    ours = [run for run in runs if run["variant"] == "ours"]
    bf16_single = [run for run in ours if run["dtype"] == "bfloat16" and run["batch_size"] == 1]
    if bf16_single:
        latency = bf16_single[0]["median_ms"]
        rows.append((f"bf16 batch-1 latency < {TARGET_BF16_LATENCY_MS:.0f} ms", f"{latency:.1f} ms",
                     "yes" if latency < TARGET_BF16_LATENCY_MS else "no"))  # fmt: skip
    if ours:
        best = max(ours, key=lambda run: run["images_per_second"])
        rows.append((f">= {TARGET_IMAGES_PER_SECOND:.0f} images/s at {results['inference']['image_size']} px",
                     f"{best['images_per_second']:.0f} images/s ({best['dtype']}, batch {best['batch_size']})",
                     "yes" if best["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "no"))  # fmt: skip
    costs = results.get("precision", {}).get("against_float32", {})
    if costs:
        worst = max(cost["max_score_difference"] for cost in costs.values())
        measured = ", ".join(f"{name} {cost['max_score_difference']:.1e}" for name, cost in costs.items())
        rows.append((f"half-precision scores within {TARGET_SCORE_DIFFERENCE:.0e} of fp32", measured,
                     "yes" if worst <= TARGET_SCORE_DIFFERENCE else "no"))  # fmt: skip
    return rows


def render_report(results: dict[str, Any], steps: list[dict[str, str]]) -> str:
    """The markdown summary of a results file."""
    lines = []
    inference = results.get("inference", {})
    info = inference.get("environment", {})
    where = info.get("gpu") or f"CPU ({info.get('cpu_threads')} threads)" if info else "unknown device"
    lines += [
        f"# GPU check: {where}",
        "",
        f"torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), transformers {info.get('transformers')}, "
        f"Python {info.get('python')}; geometry {inference.get('geometry')} ({inference.get('image_size')} px), "
        "random weights.",
        "",
    ]
    if "runs" in inference:
        peaks = ", ".join(f"{name} {value:.3g}" for name, value in inference["matmul_peak_tflops"].items())
        lines += [
            f"Matmul peak ({inference['matmul_size']}^2, random data): {peaks} TFLOP/s. Matmul FLOPs per image: "
            f"ours {inference['flops_per_image']['ours'] / 1e9:.0f} G, baseline "
            f"{inference['flops_per_image']['baseline'] / 1e9:.0f} G.",
            "",
            "| variant | dtype | batch | median ms | best ms | images/s | TFLOP/s | peak MiB (weights) | vs base |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        baseline_ms = {
            (run["dtype"], run["batch_size"]): run["median_ms"]
            for run in inference["runs"]
            if run["variant"] == "baseline"
        }
        for run in inference["runs"]:
            key = (run["dtype"], run["batch_size"])
            speedup = f"{baseline_ms[key] / run['median_ms']:.2f}x" if key in baseline_ms else "-"
            peak = "-" if run["peak_mib"] is None else f"{run['peak_mib']:,.0f} ({run['weights_mib']:,.0f})"
            name = "ours" if run["variant"] == "ours" else "baseline (reference-like)"
            lines.append(
                f"| {name} | {run['dtype']} | {run['batch_size']} | {run['median_ms']:.2f} | {run['best_ms']:.2f} | "
                f"{run['images_per_second']:.3g} | {run['tflops']:.3g} | {peak} | {speedup} |"
            )
        parity = ", ".join(
            f"{name} {value['max_score_difference']:.1e} / {value['max_map_difference']:.1e}"
            for name, value in inference["baseline_parity"].items()
        )
        lines += ["", f"Baseline against ours, max |Δ| of scores / maps: {parity}.", ""]
    if rows := target_rows(results):
        lines += ["| target (issue 15) | measured | met |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {met} |" for target, measured, met in rows]
        lines.append("")
    precision = results.get("precision", {})
    if precision.get("against_float32"):
        lines += [
            f"Half precision against float32 (TF32 off), {precision['num_images']} synthetic images "
            f"({precision['anomalous_images']} with defects), score spread (std) "
            f"{precision['score_spread_float32']:.3f}:",
            "",
            "| dtype | max abs Δ score | max abs Δ map | mean abs Δ map | Spearman (scores) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, cost in precision["against_float32"].items():
            lines.append(
                f"| {name} | {cost['max_score_difference']:.2e} | {cost['max_map_difference']:.2e} | "
                f"{cost['mean_map_difference']:.2e} | {cost['spearman_scores']:.4f} |"
            )
        lines.append("")
    for name, kernels in inference.get("attention", {}).items():
        if "error" in kernels:
            lines.append(f"- Attention, {name}: not inspected, {kernels['error']}")
            continue
        fused = kernels["fused_backends_only"]
        flash = kernels.get("vision_on_flash_only")
        names = ", ".join(f"{kernel} x{count}" for kernel, count in kernels["attention_kernels"].items()) or "none"
        lines.append(
            f"- Attention, {name}: fused backends only: {'ran' if fused['ran'] else fused['error']}"
            + (f"; vision tower on flash only: {'ran' if flash['ran'] else flash['error']}" if flash else "")
            + f"; {kernels['softmax_kernel_launches']} softmax kernels of {kernels['kernel_launches']} launches;"
            f" attention kernels: {names}"
        )
    training = results.get("training")
    if training:
        losses = " -> ".join(f"{epoch['loss']:.4f}" for epoch in training["epochs"])
        cached = [epoch["cached_features"] for epoch in training["epochs"]]
        lines.append(
            f"- Training ({training['mixed_precision']}, {training['device']}, {training['images']} images, batch "
            f"{training['batch_size']}, {training['optimizer_steps']} steps): loss {losses}; finite "
            f"{training['loss_finite']}, decreasing {training['loss_decreasing']}; cached epochs {cached}; "
            f"peak GPU {_number(training['peak_gpu_mib'], 0)} MiB"
        )
    onnx = results.get("onnx")
    if onnx:
        if "skipped" in onnx:
            lines.append(f"- ONNX Runtime: skipped, {onnx['skipped']}")
        else:
            lines.append(
                f"- ONNX Runtime ({', '.join(onnx['session_providers'])}): batch 1 median "
                f"{onnx['batch1_median_ms']:.1f} ms; max |Δ| vs torch fp32 scores "
                f"{onnx['max_score_difference_vs_torch_float32']:.1e}, "
                f"maps {onnx['max_map_difference_vs_torch_float32']:.1e}"
            )
    errors = {step: value["error"] for step, value in results.items() if isinstance(value, dict) and "error" in value}
    lines += [f"- {step} failed: {error}" for step, error in errors.items()]
    if steps:
        lines += ["", "| step | exit | seconds (timeout) |", "|---|---:|---:|"]
        lines += [f"| {row['step']} | {row['exit']} | {row['seconds']} ({row['timeout']}) |" for row in steps]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main

STEPS: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
    "inference": run_inference,
    "precision": run_precision,
    "training": run_training,
    "onnx": run_onnx,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "report"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    parser.add_argument("--device", default="cuda", help="cuda[:index] (default) or cpu, for a check of the script")
    parser.add_argument("--small", action="store_true", help="small geometry (default: official, ViT-L/14 at 518 px)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--baseline-batch-sizes", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before the batch-1 timings")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1")
    parser.add_argument("--throughput-repeats", type=int, default=5, help="timed calls at larger batch sizes")
    parser.add_argument("--num-images", type=int, default=64, help="precision: synthetic images (half with defects)")
    parser.add_argument("--precision-batch-size", type=int, default=16)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=8, help="training images per category (2 categories)")
    parser.add_argument("--train-batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    args.geometry = "small" if args.small else "official"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.step == "report":
        table = render_report(load_results(args.out), _steps(args.out))
        (args.out / TABLE_FILENAME).write_text(table)
        print(table, end="")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check {args.step}: error: no CUDA GPU visible to torch {torch.__version__}.")
    start = time.perf_counter()
    try:
        results = STEPS[args.step](args, device)
    except Exception as error:
        save_step(args.out, args.step, {"error": first_line(error), "seconds": time.perf_counter() - start})
        raise
    results["seconds"] = time.perf_counter() - start
    save_step(args.out, args.step, results)
    print(f"gpu_check {args.step}: done in {results['seconds']:.1f} s; results in {args.out / RESULTS_FILENAME}")


if __name__ == "__main__":
    main()
