"""Cost of tiled inference against image size: the pipeline on one image, whole (resized) and tiled.

For each image side, the pipeline scores one random RGB image without tiling (one forward at the model's input
size, whatever the image size) and with `tile_size` = the model's input size and 25% overlap (one forward per
tile, then stitching to full resolution). Printed: tiles, best-of-n seconds, the tiled/whole ratio, and the
tiled time per tile against the whole-image forward (above 1.0: the stitching and cropping overhead). All ratios
come from this run.

    python -m benchmarks.tiling [--geometry small|official] [--sides 224 448 896 1344] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from benchmarks.common import GEOMETRIES, random_model
from cops_hf import CoPSProcessor
from cops_hf.processing_cops import tile_boxes


def best_seconds(call, repeats: int) -> float:
    """The fastest of `repeats` timed calls (after one warm-up call)."""
    call()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=GEOMETRIES, default="small")
    parser.add_argument("--sides", type=int, nargs="+", help="image sides in pixels (default: 1x, 2x, 4x, 6x input)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = random_model(args.geometry)
    size = model.config.image_size
    sides = args.sides or [size, 2 * size, 4 * size, 6 * size]
    detector = pipeline("anomaly-detection", model=model, processor=CoPSProcessor.for_image_size(size))
    print(
        f"geometry {args.geometry} ({size} px input), tile {size} px, overlap {args.overlap}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load average at start {os.getloadavg()}"
    )
    print(f"{'side':>6} {'tiles':>6} {'whole s':>9} {'tiled s':>9} {'tiled/whole':>12} {'per tile/whole':>15}")
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for side in sides:
            image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            tiles = len(tile_boxes(side, side, size, args.overlap))
            whole = best_seconds(lambda image=image: detector(image), args.repeats)
            tiled = best_seconds(
                lambda image=image: detector(image, tile_size=size, tile_overlap=args.overlap), args.repeats
            )
            ratio, per_tile = tiled / whole, tiled / tiles / whole
            print(f"{side:>6} {tiles:>6} {whole:>9.3f} {tiled:>9.3f} {ratio:>12.2f} {per_tile:>15.2f}")


if __name__ == "__main__":
    main()
