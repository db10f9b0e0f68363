"""Load test of `cops-hf serve`: latency percentiles and throughput at several client concurrencies.

Starts `cops-hf serve` on a free 127.0.0.1 port (loopback only) with a random-weight model, sends the same small
PNG as `--requests` multipart requests at each concurrency, and prints p50/p95/p99 latency and throughput, with the
throughput ratio against concurrency 1 measured in the same run (dynamic batching should raise it). Every request
must answer 200 with one prediction: a failed or lost request stops the run with exit code 1. Bounded: each request
times out after 120 s and the whole run after `--deadline` seconds.

    python -m benchmarks.serve_load [--geometry tiny|small] [--requests 500] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cops_hf.testing_utils import random_cops_config, random_cops_model

HOST = "127.0.0.1"
IMAGE_SIZES = {"tiny": 98, "small": 224}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, max_batch_size: int, batch_wait_ms: int, deadline: float) -> tuple[Any, str]:
    """`cops-hf serve` in a subprocess on a free loopback port; returns it and its URL once /ready answers."""
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "cops_hf.cli", "serve", "--model", str(model_dir), "--host", HOST, "--port",
               str(port), "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(2)
    process.send_signal(signal.SIGTERM)
    raise SystemExit("the server did not get ready before the deadline")


async def load(url: str, image: bytes, requests: int, concurrency: int) -> tuple[list[float], float, list[str]]:
    """Send `requests` uploads of `image`, at most `concurrency` in flight; latencies (s), wall time (s), failures."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                started = time.perf_counter()
                try:
                    answer = await client.post(f"{url}/predict", files={"file": (f"{index}.png", image, "image/png")})
                    ok = answer.status_code == 200 and len(answer.json()["predictions"]) == 1
                    if not ok:
                        failures.append(f"request {index}: {answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as error:
                    failures.append(f"request {index}: {type(error).__name__} {error}")
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, wall, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(IMAGE_SIZES), default="tiny", help="random model (default tiny)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=1800, help="seconds the whole run may take")
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buffer, format="PNG")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        model_dir = Path(folder) / "model"
        config = random_cops_config(args.geometry, image_size=IMAGE_SIZES[args.geometry], image_threshold=0.5)
        random_cops_model(config, seed=0).save_pretrained(model_dir)
        process, url = start_server(model_dir, args.max_batch_size, args.batch_wait_ms, deadline)
        try:
            asyncio.run(load(url, buffer.getvalue(), 10, 1))  # warm-up, not counted
            print(f"model {args.geometry} ({IMAGE_SIZES[args.geometry]} px), 120x160 PNG uploads, "
                  f"{args.requests} requests per row, --max-batch-size {args.max_batch_size} --batch-wait-ms "
                  f"{args.batch_wait_ms}, {os.cpu_count()} cores, load average {os.getloadavg()}")  # fmt: skip
            print("| concurrency | ok | p50 ms | p95 ms | p99 ms | requests/s | vs concurrency 1 |")
            print("|---|---|---|---|---|---|---|")
            baseline = None
            failed = False
            for concurrency in args.concurrency:
                if time.monotonic() > deadline:
                    raise SystemExit("deadline reached")
                latencies, wall, failures = asyncio.run(load(url, buffer.getvalue(), args.requests, concurrency))
                throughput = len(latencies) / wall
                baseline = baseline or throughput
                p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
                print(f"| {concurrency} | {len(latencies)}/{args.requests} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
                      f"{throughput:.1f} | {throughput / baseline:.2f}x |", flush=True)  # fmt: skip
                for failure in failures[:5]:
                    print(f"  FAILED {failure}")
                failed = failed or bool(failures) or len(latencies) != args.requests
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
