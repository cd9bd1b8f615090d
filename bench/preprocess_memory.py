"""Peak memory of preprocessing many photos: it must not grow with the number of images.

    python bench/preprocess_memory.py [--images 25000] [--image-size 160] [--keep DIR]

Generates distinct JPEG photos of about 500x375 (drawn shapes, so each is different and none are
near-duplicates), runs scripts/preprocess.py on them in a child process, and samples the resident memory
of that process and its workers. Prints peak RSS of the main process, of the largest worker, and of the
whole process tree, next to the size of the arrays written. Target: under 1 GB for 25,000 photos at 160.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def draw(task: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed = task
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (500, 375), tuple(int(v) for v in rng.integers(0, 255, 3)))
    pen = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, 450)), int(rng.integers(0, 330))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=colour)
    image.save(path, "JPEG", quality=85)


def generate(root: Path, count: int) -> None:
    tasks = []
    for index in range(count):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"{index:06d}.jpg", index))
    with ProcessPoolExecutor() as pool:
        list(pool.map(draw, tasks, chunksize=256))


def tree_rss(root_pid: int) -> tuple[int, int, int]:
    """(root RSS, largest descendant RSS, total) in bytes, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * PAGE
    stack, members = [root_pid], []
    while stack:
        pid = stack.pop()
        members.append(pid)
        stack.extend(children.get(pid, []))
    descendants = [rss.get(pid, 0) for pid in members[1:]]
    return rss.get(root_pid, 0), max(descendants, default=0), sum(rss.get(pid, 0) for pid in members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument(
        "--keep", type=Path, help="generate into (or reuse) this folder instead of a temporary one"
    )
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-photos-"))
    workspace = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    try:
        if not (root / "a").is_dir() or len(list((root / "a").iterdir())) * 2 < args.images:
            started = time.perf_counter()
            generate(root, args.images)
            print(f"generated {args.images} photos in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        command = [
            sys.executable, str(ROOT / "scripts" / "preprocess.py"), "--categories", "a,b", "--images-dir", str(root),
            "--image-size", str(args.image_size), "--workspace", str(workspace),
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        peaks = [0, 0, 0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for i, value in enumerate(tree_rss(process.pid)):
                    peaks[i] = max(peaks[i], value)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        output = process.communicate()[0]
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if process.returncode:
            sys.exit(f"preprocess failed with status {process.returncode}")
        arrays = sum(path.stat().st_size for path in workspace.rglob("x.npy"))
        print(output.strip().splitlines()[-1])
        mb = 1024**2
        print(
            "\n| images | size | seconds | arrays on disk | peak RSS main | peak RSS largest worker | peak RSS all |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print(
            f"| {args.images} | {args.image_size} | {seconds:.0f} | {arrays / mb:.0f} MB | {peaks[0] / mb:.0f} MB "
            f"| {peaks[1] / mb:.0f} MB | {peaks[2] / mb:.0f} MB |"
        )
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
