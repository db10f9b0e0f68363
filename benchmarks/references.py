"""Added latency and memory of few-shot references against k, at the official geometry on CPU.

Run from the repository root::

    python -m benchmarks.references            # ViT-L/14, 518 px (37x37 patches), random weights; ~5 min on 2 cores
    python -m benchmarks.references --small    # the small random tower at 224 px, seconds

k references give k * 1369 patch features per feature layer; the greedy coreset keeps at most
`config.reference_memory_limit` of them (16384 by default), so the memory and the search stop growing past
k = 12. Building real features for 256 ViT-L images takes too long on a small CPU box, and the search costs the same
whatever the features hold, so the memory is filled with random unit vectors of the shape `set_references` would
store (the coreset's own cost is timed once, on the k = 16 memory).

Measured in one run: the zero-shot forward at batch 1 (best of n), then per k the added work of a referenced
forward (nearest-neighbour search of every patch, reference map, fusion: `CoPSForAnomalyDetection._fuse_references`)
and the whole referenced forward once at k = 16, as ratios against that zero-shot forward; the memory's size; and the
peak RSS the search adds above the model.
"""

from __future__ import annotations

import argparse
import time

import torch

from cops_hf import CoPSAnomalyDetectionOutput
from cops_hf.modeling_cops import greedy_coreset

from .common import current_rss_mib, peak_rss_mib, random_model, reset_peak_rss

SHOTS = (1, 4, 16, 64, 256)


def fill_memory(model, num_references: int, seed: int = 0) -> None:
    """Give `model` the memory `set_references` would keep for `num_references` images: random unit features,
    `min(k * patches, reference_memory_limit)` rows per feature layer."""
    config = model.config
    rows = min(num_references * config.patch_grid_size**2, config.reference_memory_limit)
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(len(config.feature_layers), rows, config.projection_dim, generator=generator)
    model._register_reference_memory(memory / memory.norm(dim=-1, keepdim=True))
    config.reference_count, config.reference_memory_size = num_references, rows


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small random tower at 224 px instead of ViT-L at 518")
    parser.add_argument("--repeats", type=int, default=3, help="timings are best of this many runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_model("small" if args.small else "official")
    config = model.config
    size, patches = config.image_size, config.patch_grid_size**2
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    noise = model.seeded_prior_noise(1, 0)
    print(
        f"geometry {'small' if args.small else 'official'} ({size} px, {patches} patches, D {config.projection_dim}, "
        f"{len(config.feature_layers)} feature layer(s)); torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; memory limit {config.reference_memory_limit} rows per layer"
    )
    with torch.no_grad():
        zero_shot = best_of(lambda: model(pixel_values, vae_noise=noise), args.repeats)
        vision = model.dual_path_vision_forward(pixel_values)
        grid = (config.patch_grid_size, config.patch_grid_size)
        patch_embeds = model.reference_features(pixel_values)  # [1, F, N, D], what the forward searches with
        baseline = model(vision_outputs=vision, vae_noise=noise)
    print(f"zero-shot forward, batch 1: {zero_shot:.3f} s (best of {args.repeats})\n")
    print("    k  memory rows  memory MiB  added s  added/zero-shot  search peak RSS MiB")
    for shots in SHOTS:
        fill_memory(model, shots)
        memory_mib = model.reference_memory.numel() * model.reference_memory.element_size() / 2**20

        def fuse() -> None:
            outputs = CoPSAnomalyDetectionOutput(
                image_scores=baseline.image_scores.clone(), anomaly_maps=baseline.anomaly_maps.clone()
            )
            model._fuse_references(outputs, patch_embeds, grid, (size, size))

        with torch.no_grad():
            added = best_of(fuse, args.repeats)
            before = current_rss_mib()
            reset_peak_rss()
            fuse()
            search_peak = peak_rss_mib() - before
        print(
            f"  {shots:>3}  {config.reference_memory_size:>11}  {memory_mib:>10.1f}  {added:>7.3f}  "
            f"{added / zero_shot:>14.1%}  {search_peak:>19.1f}"
        )
    fill_memory(model, 16)
    with torch.no_grad():
        referenced = best_of(lambda: model(pixel_values, vae_noise=noise), args.repeats)
        zero_shot_again = (model.clear_references(), best_of(lambda: model(pixel_values, vae_noise=noise), 1))[1]
    print(
        f"\nwhole forward with k = 16 references: {referenced:.3f} s, {referenced / zero_shot - 1:+.1%} against the "
        f"zero-shot forward (zero-shot measured again after it: {zero_shot_again:.3f} s)"
    )
    rows = 16 * patches
    features = torch.randn(rows, config.projection_dim, generator=torch.Generator().manual_seed(1))
    limit = min(config.reference_memory_limit, rows - 1)
    start = time.perf_counter()
    greedy_coreset(features / features.norm(dim=-1, keepdim=True), limit)
    print(f"coreset of the k = 16 memory ({rows} -> {limit} rows, once per set_references): "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
