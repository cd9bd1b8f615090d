"""The preprocessing stage: category folders of real-world photos -> uint8 numpy arrays per split.

Decoding is spread over worker processes that write each image straight into a preallocated `.npy`
file, so memory stays flat however many photos there are. A fingerprint of the file list (names, sizes,
modification times) and the options decides whether earlier arrays can be reused as they are; when only a
few files changed, only those are decoded again. Source images are only ever read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from . import cli
from .config import Workspace
from .dataset import FORMAT_VERSION, Dataset, load_dataset
from .decisions import read_decisions
from .errors import UserError
from .images import RESIZE_MODES, ImageError, list_image_files, load_array, perceptual_hash
from .options import Declaration, declared
from .splits import MIN_IMAGES_PER_CLASS, SPLITS, SplitItem, assign_splits
from .text import column_width, pad

DEFAULT_IMAGE_SIZE = 224
DEFAULT_RESIZE = "squash"
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
NEAR_DUPLICATE_BITS = 4
"""Perceptual hashes (64 bits) this close or closer count as near-duplicates."""
POOL_THRESHOLD = 64
"""Below this many files to decode, worker start-up costs more than it saves."""
SPLIT_PRIORITY = {"test": 0, "validation": 1, "train": 2, None: 3}
"""When the same picture is in given splits twice, the copy in test is the one kept."""

DATASET_MANIFEST_FIELDS = [
    "path",
    "label",
    "split",
    "index",
    "status",
    "reason",
    "sha256",
    "size",
    "mtime_ns",
    "phash",
]
"""Columns of the dataset's manifest.csv: one row per source file and what became of it."""


CATEGORIES = Declaration("2 or more, like cat,dog,horse", group="data", type=cli.categories_type(minimum=2))
IMAGES_DIR = Declaration(
    "one subfolder of photos per category; with train/, validation/ and test/ subfolders those splits are "
    "used as given",
    group="data",
    type=Path,
    default_text="WORKSPACE/images",
)
IMAGE_SIZE = Declaration("side in pixels", group="data", type=cli.positive_int)
RESIZE = Declaration(
    "fit photos to a square: centre crop, squash (stretch), or pad with black",
    group="data",
    choices=RESIZE_MODES,
)
SPLIT = Declaration(
    "shares for train, validation and test, stratified per category",
    group="data",
    type=cli.fractions_arg,
    metavar="TRAIN,VAL,TEST",
)
DEDUPE = Declaration(
    "identical files are always kept once; 'near' also drops look-alikes",
    group="data",
    choices=("exact", "near"),
)
WORKERS = Declaration(
    "processes decoding images", group="data", type=cli.non_negative_int, default_text="0, one per CPU core"
)
"""The options that decide the arrays, declared once: preprocessing and training share them."""


@dataclass(frozen=True)
class PreprocessOptions:
    categories: tuple[str, ...] = declared(CATEGORIES)
    images_dir: Path = declared(IMAGES_DIR)
    image_size: int = declared(IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    resize: str = declared(RESIZE, DEFAULT_RESIZE)
    split: tuple[float, float, float] = declared(SPLIT, DEFAULT_SPLIT)
    seed: int = declared(Declaration("for the split", group="data", type=int), 0)
    dedupe: str = declared(DEDUPE, "exact")
    workers: int = declared(WORKERS, 0, compare=False)
    """0 means one per CPU core; does not change the result."""

    def identity(self) -> dict:
        """Everything that changes the arrays (not `workers`)."""
        return {
            "categories": list(self.categories),
            "images_dir": str(self.images_dir.resolve()),
            "image_size": self.image_size,
            "resize": self.resize,
            "split": list(self.split),
            "seed": self.seed,
            "dedupe": self.dedupe,
            "format": FORMAT_VERSION,
        }


@dataclass
class SourceFile:
    path: Path
    relative: str
    label: int
    given_split: str | None
    size: int
    mtime_ns: int
    sha256: str = ""
    phash: str = ""
    status: str = ""
    reason: str = ""
    split: str = ""
    index: int = -1
    staging_row: int = -1


def dataset_name(options: PreprocessOptions) -> str:
    slug = re.sub(r"[^\w-]+", "_", "-".join(options.categories))[:40].strip("_") or "dataset"
    digest = hashlib.sha256(json.dumps(options.identity(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug}-{options.image_size}px-{digest}"


def discover(images_dir: Path, categories: Sequence[str]) -> list[SourceFile]:
    """Every candidate file of the categories, with its label and, when the folder has them, its split."""
    if not images_dir.is_dir():
        raise UserError(
            f"image folder {images_dir} does not exist; put one subfolder of photos per category there "
            f"(like {images_dir / categories[0]}/) or point --images-dir at your folder"
        )
    given = all((images_dir / split).is_dir() for split in SPLITS)
    roots = [(split, images_dir / split) for split in SPLITS] if given else [(None, images_dir)]
    decisions = read_decisions(images_dir)
    labels = {category: label for label, category in enumerate(categories)}
    found: list[SourceFile] = []
    for split, root in roots:
        for category in categories:
            folder = root / category
            if not folder.is_dir():
                present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
                raise UserError(
                    f"no folder for category {category!r} in {root} (found: {', '.join(present) or 'none'}); "
                    f"create {folder} with its images or fix --categories"
                )
            files = list_image_files(folder)
            if not files:
                raise UserError(f"the folder for category {category!r} ({folder}) is empty; add images to it")
            for path in files:
                relative = path.relative_to(images_dir).as_posix()
                used_as = decisions.category_of(relative, category)
                if used_as not in labels:
                    continue
                stat = path.stat()
                found.append(
                    SourceFile(
                        path=path,
                        relative=relative,
                        label=labels[used_as],
                        given_split=split,
                        size=stat.st_size,
                        mtime_ns=stat.st_mtime_ns,
                    )
                )
    return found


def fingerprint(options: PreprocessOptions, files: Sequence[SourceFile]) -> str:
    digest = hashlib.sha256(json.dumps(options.identity(), sort_keys=True).encode())
    for item in files:
        digest.update(
            f"{item.relative}\0{item.size}\0{item.mtime_ns}\0{item.label}\0{item.given_split}\n".encode()
        )
    return digest.hexdigest()


def _data_offset(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").offset)


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """Preallocate a uint8 .npy file (sparse on disk) and return where its data starts."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    del array
    return _data_offset(path)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _decode_one(path: Path, size: int, resize: str, fd: int, offset: int) -> tuple[str, str, str, str]:
    """Read, hash, decode and store one file; returns (sha256, phash, status, reason)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return "", "", "skipped", f"cannot read file: {error.strerror or error}"
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        array = load_array(data, size, resize)  # type: ignore[arg-type]
    except ImageError as error:
        return sha256, "", "skipped", str(error)
    except Exception as error:  # a codec bug on one odd file must not stop the run
        return sha256, "", "skipped", f"cannot decode: {type(error).__name__}: {error}"
    _pwrite_all(fd, array.tobytes(), offset)
    return sha256, perceptual_hash(array), "ok", ""


_worker_state: dict = {}


def _init_worker(staging: str, data_offset: int, size: int, resize: str) -> None:
    _worker_state.update(fd=os.open(staging, os.O_WRONLY), offset=data_offset, size=size, resize=resize)


def _worker_decode(task: tuple[int, str]) -> tuple[int, tuple[str, str, str, str]]:
    row, path = task
    state = _worker_state
    row_bytes = state["size"] * state["size"] * 3
    return row, _decode_one(
        Path(path), state["size"], state["resize"], state["fd"], state["offset"] + row * row_bytes
    )


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=description, unit="img", mininterval=0.5, file=sys.stderr, disable=total == 0
    )


def _decode_all(
    todo: list[SourceFile], staging: Path, data_offset: int, options: PreprocessOptions, workers: int
) -> None:
    row_bytes = options.image_size * options.image_size * 3
    with _progress(len(todo), "Decoding images") as bar:
        if workers <= 1 or len(todo) < POOL_THRESHOLD:
            fd = os.open(staging, os.O_WRONLY)
            try:
                for item in todo:
                    result = _decode_one(
                        item.path,
                        options.image_size,
                        options.resize,
                        fd,
                        data_offset + item.staging_row * row_bytes,
                    )
                    item.sha256, item.phash, item.status, item.reason = result
                    bar.update()
            finally:
                os.close(fd)
            return
        by_row = {item.staging_row: item for item in todo}
        context = get_context("spawn")  # never fork a process that may already run TensorFlow threads
        initargs = (str(staging), data_offset, options.image_size, options.resize)
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=initargs
        ) as pool:
            tasks = [(item.staging_row, str(item.path)) for item in todo]
            for row, result in pool.map(_worker_decode, tasks, chunksize=16):
                item = by_row[row]
                item.sha256, item.phash, item.status, item.reason = result
                bar.update()


def _previous_rows(folder: Path) -> dict[str, dict]:
    """Rows of an earlier manifest of this dataset, by source path, for incremental updates."""
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        return {}
    with open(manifest, newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def _reuse_previous(
    files: list[SourceFile], folder: Path, staging: Path, data_offset: int, row_bytes: int
) -> int:
    """Copy unchanged images from the earlier arrays; returns how many were reused."""
    previous = _previous_rows(folder)
    sources: dict[str, tuple[int, int]] = {}
    reused = 0
    out = os.open(staging, os.O_WRONLY)
    try:
        for item in files:
            row = previous.get(item.relative)
            if not row or row["size"] != str(item.size) or row["mtime_ns"] != str(item.mtime_ns):
                continue
            if row["status"] == "skipped":
                item.sha256, item.status, item.reason = row["sha256"], "skipped", row["reason"]
                reused += 1
            elif row["status"] == "ok":
                split_file = folder / row["split"] / "x.npy"
                if row["split"] not in sources:
                    if not split_file.exists():
                        continue
                    sources[row["split"]] = (os.open(split_file, os.O_RDONLY), _data_offset(split_file))
                fd, offset = sources[row["split"]]
                data = os.pread(fd, row_bytes, offset + int(row["index"]) * row_bytes)
                if len(data) != row_bytes:
                    continue
                _pwrite_all(out, data, data_offset + item.staging_row * row_bytes)
                item.sha256, item.phash, item.status = row["sha256"], row["phash"], "ok"
                reused += 1
    finally:
        os.close(out)
        for fd, _ in sources.values():
            os.close(fd)
    return reused


def _priority(item: SourceFile) -> tuple:
    return (SPLIT_PRIORITY[item.given_split], item.label, item.relative)


def _remove_exact_duplicates(files: list[SourceFile], categories: Sequence[str]) -> None:
    keeper: dict[str, SourceFile] = {}
    for item in sorted((f for f in files if f.status == "ok"), key=_priority):
        first = keeper.setdefault(item.sha256, item)
        if first is not item:
            item.status = "duplicate"
            where = "" if first.label == item.label else f" in category {categories[first.label]!r}"
            item.reason = f"same file as {first.relative}{where}"


def find_near_duplicates(
    hashes: Sequence[str], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance) of 64-bit perceptual hashes at most `max_bits` apart, i < j."""
    if len(hashes) < 2:
        return []
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    pairs = []
    block = 256
    for start in range(0, len(values), block):
        chunk = values[start : start + block]
        distances = np.bitwise_count(chunk[:, None] ^ values[None, :])
        rows, cols = np.nonzero(distances <= max_bits)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c:
                pairs.append((i, c, int(distances[r, c])))
    return pairs


def _near_duplicates(
    files: list[SourceFile], options: PreprocessOptions
) -> tuple[list[tuple], dict[int, int]]:
    """Report near-duplicate pairs, remove them with --dedupe near, and group the rest for splitting."""
    kept = sorted((f for f in files if f.status == "ok"), key=_priority)
    pairs = find_near_duplicates([f.phash for f in kept])
    parent = list(range(len(kept)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    report = []
    for i, j, distance in pairs:
        first, second = kept[i], kept[j]
        report.append((first.relative, second.relative, distance))
        if options.dedupe == "near" and second.status == "ok" and first.status == "ok":
            second.status = "near-duplicate"
            second.reason = f"looks like {first.relative} (perceptual hash {distance} bits apart)"
        elif first.label == second.label:
            parent[root(j)] = root(i)
    groups = {id(item): root(k) for k, item in enumerate(kept)}
    return report, groups


def _check_counts(files: list[SourceFile], options: PreprocessOptions) -> None:
    for label, category in enumerate(options.categories):
        mine = [f for f in files if f.label == label]
        usable = sum(f.status == "ok" for f in mine)
        lost = Counter(f.status for f in mine if f.status != "ok")
        detail = ", ".join(f"{count} {status}" for status, count in sorted(lost.items()))
        detail = f" ({detail})" if detail else ""
        folder = options.images_dir / category
        if mine and mine[0].given_split:
            for split in SPLITS:
                if not any(f.status == "ok" and f.given_split == split for f in mine):
                    raise UserError(
                        f"category {category!r} has no usable image in the {split} split "
                        f"({options.images_dir / split / category}); add images there"
                    )
        elif usable < MIN_IMAGES_PER_CLASS:
            raise UserError(
                f"category {category!r} has only {usable} usable images{detail}; at least "
                f"{MIN_IMAGES_PER_CLASS} are needed to split into train, validation and test: add images to {folder}"
            )


def _write_outputs(
    files: list[SourceFile],
    options: PreprocessOptions,
    out: Path,
    staging: Path,
    staging_offset: int,
    near_pairs: list[tuple],
    print_fn,
) -> dict:
    size = options.image_size
    row_bytes = size * size * 3
    counts: dict = {}
    source = os.open(staging, os.O_RDONLY)
    try:
        for split in SPLITS:
            members = sorted(
                (f for f in files if f.status == "ok" and f.split == split),
                key=lambda f: (f.label, f.relative),
            )
            (out / split).mkdir(parents=True)
            x_path = out / split / "x.npy"
            offset = _create_npy(x_path, (len(members), size, size, 3))
            target = os.open(x_path, os.O_WRONLY)
            try:
                for index, item in enumerate(members):
                    item.index = index
                    data = os.pread(source, row_bytes, staging_offset + item.staging_row * row_bytes)
                    _pwrite_all(target, data, offset + index * row_bytes)
            finally:
                os.close(target)
            np.save(out / split / "y.npy", np.array([f.label for f in members], dtype=np.int32))
            per_class = Counter(options.categories[f.label] for f in members)
            counts[split] = {"total": len(members), **{c: per_class.get(c, 0) for c in options.categories}}
    finally:
        os.close(source)
    _write_records(files, options, out, near_pairs)
    return counts


def _write_records(
    files: list[SourceFile], options: PreprocessOptions, out: Path, near_pairs: list[tuple]
) -> None:
    """What became of each source file (manifest.csv, skipped.csv, near_duplicates.csv) and the labels."""
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=DATASET_MANIFEST_FIELDS)
        writer.writeheader()
        for item in files:
            writer.writerow(
                {
                    "path": item.relative,
                    "label": options.categories[item.label],
                    "split": item.split or (item.given_split or ""),
                    "index": item.index if item.status == "ok" else "",
                    "status": item.status,
                    "reason": item.reason,
                    "sha256": item.sha256,
                    "size": item.size,
                    "mtime_ns": item.mtime_ns,
                    "phash": item.phash,
                }
            )
    with open(out / "skipped.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "status", "reason"])
        for item in files:
            if item.status != "ok":
                writer.writerow([item.relative, options.categories[item.label], item.status, item.reason])
    with open(out / "near_duplicates.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "looks_like", "hash_distance_bits"])
        writer.writerows((b, a, d) for a, b, d in near_pairs)
    (out / "labels.json").write_text(
        json.dumps(list(options.categories), ensure_ascii=False, indent=1), "utf-8"
    )


def _remove_stale_temporaries(root: Path, name: str) -> None:
    for leftover in root.glob(f".{name}.*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_dataset(options: PreprocessOptions, workspace: Workspace, print_fn=print) -> Dataset:
    """Arrays for these images and options: reused when up to date, otherwise made (incrementally)."""
    if options.resize not in RESIZE_MODES:
        raise UserError(f"unknown --resize {options.resize!r}; choose from {', '.join(RESIZE_MODES)}")
    if options.dedupe not in ("exact", "near"):
        raise UserError(f"unknown --dedupe {options.dedupe!r}; choose exact or near")
    started = time.monotonic()
    files = discover(options.images_dir, options.categories)
    stamp = fingerprint(options, files)
    name = dataset_name(options)
    folder = workspace.datasets / name
    if (folder / "dataset.json").exists():
        existing = load_dataset(folder)
        if existing.fingerprint == stamp:
            print_fn(f"Arrays up to date, reusing {folder} ({sum(existing.count(s) for s in SPLITS)} images)")
            return existing

    workspace.datasets.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(workspace.datasets, name)
    work = workspace.datasets / f".{name}.tmp-{os.getpid()}"
    work.mkdir()
    try:
        size = options.image_size
        row_bytes = size * size * 3
        for row, item in enumerate(files):
            item.staging_row = row
        staging = work / "staging.npy"
        staging_offset = _create_npy(staging, (len(files), size, size, 3))
        reused = _reuse_previous(files, folder, staging, staging_offset, row_bytes)
        todo = [item for item in files if not item.status]
        workers = options.workers or len(os.sched_getaffinity(0))
        _decode_all(todo, staging, staging_offset, options, workers)

        _remove_exact_duplicates(files, options.categories)
        near_pairs, groups = _near_duplicates(files, options)
        _check_counts(files, options)
        kept = _split(files, options, groups)
        counts = _write_outputs(files, options, work, staging, staging_offset, near_pairs, print_fn)
        staging.unlink()
        status_counts = Counter(f.status for f in files)
        info = {
            "format": FORMAT_VERSION,
            "name": name,
            "fingerprint": stamp,
            "options": {
                **asdict(options),
                "images_dir": str(options.images_dir.resolve()),
                "categories": list(options.categories),
            },
            "splits_given": bool(kept[0].given_split),
            "counts": counts,
            "files": {"total": len(files), "decoded": len(todo), "reused": reused, **status_counts},
            "near_duplicate_pairs": len(near_pairs),
            "decisions": read_decisions(options.images_dir).summary(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        info["options"].pop("workers", None)
        (work / "dataset.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), "utf-8")
        _install(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    dataset = load_dataset(folder)
    print_fn(summarize(dataset, files, time.monotonic() - started))
    return dataset


def _split(files: list[SourceFile], options: PreprocessOptions, groups: dict) -> list[SourceFile]:
    """Give each kept file its split: the given one, or a stratified draw that keeps look-alikes together."""
    kept = [f for f in files if f.status == "ok"]
    if kept[0].given_split:
        for item in kept:
            item.split = item.given_split or ""
        return kept
    items = [SplitItem(label=f.label, key=f.sha256, group=groups[id(f)]) for f in kept]
    for item, split in zip(kept, assign_splits(items, options.split, options.seed), strict=True):
        item.split = split
    return kept


def _install(work: Path, folder: Path) -> None:
    """Swap the finished arrays in for the old ones, so a reader never finds half a dataset."""
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(retired)
        work.rename(folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        work.rename(folder)


def summarize(dataset: Dataset, files: Sequence[SourceFile], seconds: float) -> str:
    """Per-class counts per split, and what was left out and why."""
    info = dataset.info
    width = column_width("category", *dataset.labels)
    lines = [f"{pad('category', width)}  {'train':>7}  {'validation':>10}  {'test':>6}"]
    for label in [*dataset.labels, "total"]:
        key = "total" if label == "total" else label
        lines.append(
            f"{pad(label, width)}  {info['counts']['train'][key]:>7}  {info['counts']['validation'][key]:>10}"
            f"  {info['counts']['test'][key]:>6}"
        )
    stats = info["files"]
    left_out = [f for f in files if f.status != "ok"]
    reasons = Counter(f.reason.split(":")[0] if f.status == "skipped" else f.status for f in left_out)
    summary = (
        f"Preprocessed {stats['total']} files in {seconds:.1f}s ({stats['decoded']} decoded, {stats['reused']} reused) "
        f"into {dataset.path}"
    )
    if left_out:
        detail = "; ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        summary += f"\nLeft out {len(left_out)} files ({detail}): see {dataset.path / 'skipped.csv'}"
    if info["near_duplicate_pairs"]:
        summary += (
            f"\nFound {info['near_duplicate_pairs']} pairs of near-duplicate images: see "
            f"{dataset.path / 'near_duplicates.csv'}"
            + ("" if info["options"]["dedupe"] == "near" else " (--dedupe near removes them)")
        )
    return "\n".join(lines) + "\n" + summary
