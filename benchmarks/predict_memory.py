"""Peak memory of `cops-hf predict` over many images: it must not grow with the number of images.

Each run is a fresh process (`python -m cops_hf.cli predict ...` with overlays and masks, as a user runs it) over
N small synthetic images; the process reports its own peak RSS (`VmHWM`) when predict has returned. Rows are
written as images are scored, so the peak at 300 images should stay within 20% of the peak at 30.

    python -m benchmarks.predict_memory [--counts 30 300] [--size 64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cops_hf.testing_utils import random_cops_config, random_cops_model

_DRIVER = """
import sys
from benchmarks.common import peak_rss_mib
from cops_hf.cli import main
code = main(sys.argv[1:])
print(f"PEAK_RSS_MIB {peak_rss_mib():.1f}")
sys.exit(code)
"""


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` random RGB PNGs of `size` x `size` pixels in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")


def predict_peak_rss(model_dir: Path, images: Path, output: Path) -> float:
    """Peak RSS (MiB) of one `cops-hf -q predict` process over the folder `images`."""
    command = [sys.executable, "-c", _DRIVER, "-q", "predict", "--model", str(model_dir), str(images), "--output",
               str(output), "--threshold", "0.5", "--image-threshold", "0.5", "--device", "cpu"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")]
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[30, 300], help="numbers of images (default 30 300)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cops-predict-memory-") as temporary:
        root = Path(temporary)
        random_cops_model(random_cops_config("tiny", image_size=98)).save_pretrained(root / "model")
        peaks = {}
        for count in args.counts:
            write_images(root / f"images_{count}", count, args.size)
            peaks[count] = predict_peak_rss(root / "model", root / f"images_{count}", root / f"out_{count}")
            rows = len((root / f"out_{count}" / "scores.csv").read_text().splitlines()) - 1
            print(f"{count:>6} images ({rows} rows written): peak RSS {peaks[count]:.1f} MiB")
    first, last = args.counts[0], args.counts[-1]
    print(f"peak at {last} / peak at {first}: {peaks[last] / peaks[first]:.3f} (target <= 1.20)")


if __name__ == "__main__":
    main()
