"""A bounded load test of scripts/serve.py on loopback: latency, photos per second, failures and memory.

    python bench/serve_load.py --workspace WS [--run latest] [--requests 200] [--clients 8] [--photos DIR]

Starts the server in a child process on 127.0.0.1 (a free port), sends `--requests` POST /predict requests
with one real photo each from `--clients` concurrent clients (keep-alive connections, as a program would
use), and prints the p50/p95 latency, photos per second, the failed requests (target: none), the photos per
model call (the batching) and the server's resident memory after a warm-up round and at the end (target: it
does not grow). The baseline, measured in this process before the server starts, is the same run's
Predictor on the same photos, decoded here: one photo per model call (what a server without batching
does) and 32 per call (the model's best). Photos default to ../shared/datasets/animals10_sample.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "datasets" / "animals10_sample"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 1024 / 1024


def photos_of(folder: Path, count: int) -> list[tuple[str, bytes]]:
    from image_classifier.images import list_image_files

    files = [path for path in list_image_files(folder) if path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return [(path.name, path.read_bytes()) for path in files[:count]]


def baseline(workspace: Path, run_name: str, photos: list[tuple[str, bytes]]) -> dict[str, float]:
    """Photos per second of the run's Predictor in this process: decoding plus 1, then 32, photos a call."""
    import numpy as np

    from image_classifier.config import Workspace
    from image_classifier.images import load_array
    from image_classifier.predict import Predictor
    from image_classifier.runs import RunFolder

    run = RunFolder.find(Workspace(workspace), run_name)
    predictor = Predictor(run)
    decode = [load_array(data, run.image_size, run.resize) for _, data in photos]  # type: ignore[arg-type]
    predictor.predictions(["warm-up"], np.stack(decode[:1]))
    rates = {}
    for batch in (1, 32):
        started = time.perf_counter()
        for start in range(0, len(photos), batch):
            chunk = photos[start : start + batch]
            arrays = np.stack([load_array(data, run.image_size, run.resize) for _, data in chunk])  # type: ignore[arg-type]
            predictor.predictions([name for name, _ in chunk], arrays)
        rates[f"batch {batch}"] = len(photos) / (time.perf_counter() - started)
    return rates


def start_server(workspace: Path, run: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--workspace", str(workspace)]
    process = subprocess.Popen(
        [*command, "--run", run, "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    for line in process.stderr:
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        if found:
            threading.Thread(
                target=lambda: [None for _ in process.stderr], daemon=True
            ).start()  # drain the log
            return process, found.group(1)
    raise SystemExit(f"the server stopped before serving (exit {process.wait()})")


def load(
    url: str, photos: list[tuple[str, bytes]], requests_total: int, clients: int
) -> tuple[list[float], list[str], float]:
    """(latencies in seconds, failures, wall seconds) of `requests_total` requests from `clients` threads."""
    import requests

    local = threading.local()

    def one(index: int) -> tuple[float, str | None]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        name, data = photos[index % len(photos)]
        started = time.perf_counter()
        try:
            response = session.post(url + "predict", files={"file": (name, data)}, timeout=120)
            ok = response.status_code == 200 and len(response.json()["predictions"]) == 1
            failure = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
        except Exception as error:  # a failed request is counted and shown, not fatal to the test
            failure = f"{type(error).__name__}: {error}"
        return time.perf_counter() - started, failure

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests_total)))
    wall = time.perf_counter() - started
    return [latency for latency, _ in results], [failure for _, failure in results if failure], wall


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--run", default="latest")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    args = parser.parse_args()
    import requests

    photos = photos_of(args.photos, 64)
    rates = baseline(args.workspace, args.run, photos)
    process, url = start_server(args.workspace, args.run)
    try:
        load(url, photos, 4 * args.clients, args.clients)  # warm-up: every client's connection and thread
        warm = rss_mb(process.pid)
        before = requests.get(url + "health", timeout=30).json()
        latencies, failures, wall = load(url, photos, args.requests, args.clients)
        after = requests.get(url + "health", timeout=30).json()
        end = rss_mb(process.pid)
        load(url, photos, args.requests, args.clients)
        again = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    batches = after["batches"] - before["batches"]
    print(
        f"run {after['run']} ({after['image_size']} px), {len(photos)} distinct photos, {args.clients} clients"
    )
    print(f"requests: {len(latencies)}, failed: {len(failures)}")
    for failure in failures[:5]:
        print(f"  {failure}")
    print(
        f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms"
    )
    print(
        f"server: {len(latencies) / wall:.1f} photos/s; {len(latencies) / max(batches, 1):.1f} photos per model call"
    )
    for name, rate in rates.items():
        print(f"baseline, in process, {name}: {rate:.1f} photos/s")
    print(
        f"server memory: {warm:.0f} MB after warm-up, {end:.0f} MB after {args.requests}, {again:.0f} MB after {2 * args.requests}"
    )


if __name__ == "__main__":
    main()
