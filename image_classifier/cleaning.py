"""The review: which photos a user should look at before training, and why, without touching any of them.

Three kinds of issue, each ranked (rank 1 is the likeliest):
- label: a photo whose category looks wrong. Out-of-fold probabilities of a logistic regression on the
  backbone features (each photo scored by a head that never saw it), then cleanlab's confident learning
  (`find_label_issues`, whose per-category thresholds are the average confidence of that category's own
  photos) decides which are flagged, and its self-confidence orders them; the suggestion is the best other class.
- off-topic: a photo that fits no category. cleanlab's `OutOfDistribution` on the features: the mean cosine
  distance to the k = sqrt(N) nearest photos (k grows with the folder, so a batch of look-alike strays, such
  as the drawings a keyword search brings, cannot vouch for one another); flagged past the upper Tukey
  fence of those distances (Q3 + 1.5 IQR), a threshold the folder itself gives.
- duplicate: identical files and near-duplicates, as preprocessing found them (manifest.csv,
  near_duplicates.csv).

images/review/ (in the workspace) holds review.csv, review.html and review.json (what was reviewed and the
photos' fingerprint, so decisions made on a review of other photos are refused). Decisions are recorded
only through decisions.py (exclude.txt, relabel.csv beside the photos).
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import cli
from .atomic import write_atomic, write_json
from .config import Workspace
from .dataset import Dataset
from .decisions import EXCLUDE_FILE, RELABEL_FILE, normalize, record_decisions
from .engines import ENGINES
from .errors import UserError
from .images import list_image_files
from .models import DEFAULT_MODEL, REGISTRY, get_spec
from .options import Declaration, declared
from .preprocess import (
    CATEGORIES,
    DEDUPE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_RESIZE,
    DEFAULT_SPLIT,
    IMAGE_SIZE,
    IMAGES_DIR,
    RESIZE,
    SPLIT,
    WORKERS,
    PreprocessOptions,
    discover,
    prepare_dataset,
)
from .splits import SPLITS

REVIEW_FIELDS = ("file", "given", "suggested", "issue", "score", "rank")
ISSUES = ("label", "off-topic", "duplicate")
DECISION_FIELDS = ("file", "decision", "category")
DECISIONS = ("keep", "exclude", "move")
FENCE = 1.5
"""Tukey's fence: distances more than 1.5 interquartile ranges above the third quartile are outliers."""
HEAD_C = 0.01
"""Inverse L2 strength of the out-of-fold logistic regression. Measured on trashnet with 10% flips and 5%
off-topic photos (bench/clean_noise.py's folder): C 0.1 / 0.01 / 0.003 gave out-of-fold accuracy 66.4 / 69.7 /
71.0% and flip recall 0.938 / 0.934 / 0.916 at precision 0.31 / 0.37 / 0.42; strong regularization keeps the
head from learning the flipped labels, and 0.01 keeps the recall target with room."""

PrintFn = Callable[..., object]


@dataclass(frozen=True)
class CleanOptions:
    """What the review is computed from: the photos as preprocessing prepares them, and the backbone."""

    categories: tuple[str, ...] = declared(CATEGORIES)
    images_dir: Path = declared(IMAGES_DIR)
    image_size: int = declared(IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    resize: str = declared(RESIZE, DEFAULT_RESIZE)
    split: tuple[float, float, float] = declared(SPLIT, DEFAULT_SPLIT)
    seed: int = declared(Declaration("for the split and the folds", group="data", type=int), 0)
    dedupe: str = declared(DEDUPE, "exact")
    workers: int = declared(WORKERS, 0, compare=False)
    model: str = declared(
        Declaration(
            "the pretrained backbone whose features are compared",
            group="review",
            choices=tuple(name for name, spec in REGISTRY.items() if spec.pretrained),
            metavar="NAME",
        ),
        DEFAULT_MODEL,
    )
    engine: str | None = declared(
        Declaration(
            "what runs the backbone (as for training)",
            group="review",
            choices=ENGINES,
            default_text="litert on a CPU, keras on a GPU",
        ),
        None,
    )
    folds: int = declared(
        Declaration(
            "K: each photo is scored by a head trained on the other K-1 folds",
            group="review",
            type=cli.positive_int,
        ),
        5,
    )

    def preprocess_options(self) -> PreprocessOptions:
        """The same arrays (and so the same cached features) as training with these options uses."""
        names = {item.name for item in fields(PreprocessOptions)}
        return PreprocessOptions(**{name: getattr(self, name) for name in names})


@dataclass(frozen=True)
class Flag:
    file: str
    given: str
    suggested: str
    issue: str
    score: float
    twin: str = ""
    """For a duplicate: the photo it copies."""


@dataclass
class Review:
    flags: list[Flag]
    photos: int
    thresholds: dict = field(default_factory=dict)

    def of(self, issue: str) -> list[Flag]:
        return sorted((f for f in self.flags if f.issue == issue), key=lambda f: (-f.score, f.file))


def review_folder(workspace: Workspace) -> Path:
    return workspace.images / "review"


def photo_files(images_dir: Path, categories: tuple[str, ...]) -> dict[str, str]:
    """Every photo of the categories (path relative to the images folder -> its folder's category),
    whatever the decisions say: what a decisions file may name."""
    given = all((images_dir / split).is_dir() for split in SPLITS)
    roots = [images_dir / split for split in SPLITS] if given else [images_dir]
    found = {}
    for root in roots:
        for category in categories:
            for path in list_image_files(root / category) if (root / category).is_dir() else []:
                found[path.relative_to(images_dir).as_posix()] = category
    return found


def photos_fingerprint(images_dir: Path, categories: tuple[str, ...]) -> str:
    """Names, sizes and modification times of the photos: changes when a photo is added, removed or edited,
    not when a decision is recorded."""
    digest = hashlib.sha256("\0".join(categories).encode())
    for relative in sorted(photo_files(images_dir, categories)):
        stat = (images_dir / relative).stat()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def dataset_rows(dataset: Dataset) -> tuple[list[str], np.ndarray]:
    """Every usable photo of every split, in split order: paths and class ids."""
    files, labels = [], []
    for split in SPLITS:
        files += dataset.source_files(split)
        labels.append(np.asarray(dataset.arrays(split)[1]))
    return files, np.concatenate(labels).astype(np.int64)


def check_folds(labels: np.ndarray, categories: list[str], folds: int, images_dir: Path) -> None:
    if folds < 2:
        raise UserError(
            f"--folds must be at least 2 (each photo is scored by a head trained on the others), got {folds}"
        )
    counts = np.bincount(labels, minlength=len(categories))
    few = [f"{categories[i]} ({n})" for i, n in enumerate(counts) if n < folds]
    if few:
        raise UserError(
            f"too few photos for {folds} folds in {', '.join(few)}: each category needs at least {folds}; "
            f"add photos to {images_dir} or lower --folds"
        )


def backbone_features(dataset: Dataset, options: CleanOptions, workspace: Workspace, print_fn: PrintFn):
    """The pooled features of every photo, through features.py (cached, shared with training)."""
    from .features import BackboneFeatures
    from .models import build_model

    spec = get_spec(options.model)
    built = build_model(
        spec, len(dataset.labels), options.image_size, resize=options.resize, weights="imagenet"
    )
    features = BackboneFeatures(
        built.features, spec.name, options.image_size, workspace, options.engine, print_fn
    )
    rows = np.concatenate([features.of_split(dataset, split) for split in SPLITS])
    print_fn(features.summary())
    return rows


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each photo's class probabilities from a head that did not see it (stratified K folds).

    A standardized multinomial logistic regression: convex, so no epochs to pick and a few seconds per fold
    per thousand photos, and on backbone features as accurate as the Keras head."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from tqdm.auto import tqdm

    classes = int(labels.max()) + 1
    probabilities = np.zeros((len(labels), classes), np.float64)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, held in tqdm(list(splitter.split(features, labels)), desc="Out-of-fold heads", unit="fold"):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=HEAD_C, max_iter=2000))
        head.fit(features[train], labels[train])
        probabilities[np.ix_(held, head.classes_)] = head.predict_proba(features[held])
    return probabilities


def label_flags(files, labels, probabilities, categories) -> list[Flag]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    issues = find_label_issues(labels, probabilities)
    quality = get_label_quality_scores(labels, probabilities)
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1
    suggested = others.argmax(axis=1)
    return [
        Flag(
            files[i],
            categories[labels[i]],
            categories[suggested[i]],
            "label",
            round(1 - float(quality[i]), 4),
        )
        for i in np.flatnonzero(issues)
    ]


def off_topic_scores(features: np.ndarray) -> np.ndarray:
    """cleanlab's out-of-distribution score (1 typical, towards 0 unlike every other photo), k = sqrt(N)."""
    from cleanlab.outlier import OutOfDistribution

    neighbours = int(np.clip(round(np.sqrt(len(features))), 1, len(features) - 1))
    ood = OutOfDistribution({"k": neighbours})
    return np.asarray(ood.fit_score(features=np.asarray(features, np.float32), verbose=False))


def upper_fence(values: np.ndarray) -> float:
    """The threshold the data gives: Q3 + 1.5 IQR of the values themselves."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + FENCE * (q3 - q1))


def off_topic_flags(files, labels, scores, probabilities, categories) -> tuple[list[Flag], float]:
    """cleanlab's score is exp(-distance / scale), so -log(score) is the mean distance, up to the scale."""
    distance = -np.log(np.maximum(scores, 1e-300))
    threshold = upper_fence(distance)
    best = probabilities.argmax(axis=1)
    flags = [
        Flag(
            files[i], categories[labels[i]], categories[best[i]], "off-topic", round(1 - float(scores[i]), 4)
        )
        for i in np.flatnonzero(distance > threshold)
    ]
    return flags, float(np.exp(-threshold))


def duplicate_flags(dataset: Dataset) -> list[Flag]:
    """Identical files (one copy is already left out) and look-alikes, as preprocessing found them."""
    with open(dataset.path / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    label = {row["path"]: row["label"] for row in rows}
    kept = {row["sha256"]: row["path"] for row in rows if row["status"] == "ok"}
    flags: dict[str, Flag] = {}
    for row in rows:
        twin = kept.get(row["sha256"])
        if row["status"] == "duplicate" and twin:
            flags[row["path"]] = Flag(row["path"], row["label"], label[twin], "duplicate", 1.0, twin)
    with open(dataset.path / "near_duplicates.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            path, twin = row["path"], row["looks_like"]
            score = round(1 - int(row["hash_distance_bits"]) / 64, 4)
            if path in label and twin in label and (path not in flags or flags[path].score < score):
                flags[path] = Flag(path, label[path], label[twin], "duplicate", score, twin)
    return list(flags.values())


def rank_photos(options: CleanOptions, workspace: Workspace, print_fn: PrintFn = print) -> Review:
    """Prepare the photos (or reuse the arrays), then flag and score every one of them. The folds are
    checked on the file list first, so too few photos change nothing in the workspace."""
    if options.images_dir.resolve() == workspace.images.resolve() and "review" in options.categories:
        raise UserError(
            "a category cannot be called 'review' here: images/review/ holds the review; rename it"
        )
    found = discover(options.images_dir, options.categories)
    check_folds(
        np.array([f.label for f in found], np.int64),
        list(options.categories),
        options.folds,
        options.images_dir,
    )
    dataset = prepare_dataset(options.preprocess_options(), workspace, print_fn=print_fn)
    files, labels = dataset_rows(dataset)
    check_folds(labels, dataset.labels, options.folds, options.images_dir)
    features = backbone_features(dataset, options, workspace, print_fn)
    probabilities = out_of_fold_probabilities(features, labels, options.folds, options.seed)
    scores = off_topic_scores(features)
    off_topic, threshold = off_topic_flags(files, labels, scores, probabilities, dataset.labels)
    flags = label_flags(files, labels, probabilities, dataset.labels) + off_topic + duplicate_flags(dataset)
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    thresholds = {"off_topic_score_below": round(threshold, 4), "out_of_fold_accuracy": round(accuracy, 4)}
    return Review(flags, len(files), thresholds)


def review_rows(review: Review) -> list[dict]:
    rows = []
    for issue in ISSUES:
        for rank, flag in enumerate(review.of(issue), 1):
            rows.append({"file": flag.file, "given": flag.given, "suggested": flag.suggested,
                         "issue": issue, "score": flag.score, "rank": rank, "twin": flag.twin})  # fmt: skip
    return rows


def write_review(
    review: Review, options: CleanOptions, workspace: Workspace, print_fn: PrintFn = print
) -> Path:
    """review.csv, review.json and review.html, each written whole (a reader never sees half of one)."""
    from .review_page import review_html

    folder = review_folder(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    rows = review_rows(review)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=REVIEW_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(folder / "review.csv", out.getvalue().encode())
    record = {
        "images_dir": str(options.images_dir.resolve()),
        "categories": list(options.categories),
        "photos_fingerprint": photos_fingerprint(options.images_dir, options.categories),
        "photos": review.photos,
        "flagged": dict(Counter(row["issue"] for row in rows)),
        "thresholds": review.thresholds,
        "model": options.model,
        "folds": options.folds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(folder / "review.json", record)
    write_atomic(
        folder / "review.html", review_html(rows, options.images_dir, list(options.categories)).encode()
    )
    counts = ", ".join(f"{record['flagged'].get(issue, 0)} {issue}" for issue in ISSUES)
    print_fn(
        f"Review of {review.photos} photos: {counts} (out-of-fold accuracy {review.thresholds['out_of_fold_accuracy']:.1%})"
        f"\nOpen {folder / 'review.html'} (or run clean.py --serve) and mark each photo; {folder / 'review.csv'} "
        "lists them ranked"
    )
    return folder


def current_review(workspace: Workspace, options: CleanOptions) -> dict:
    """review.json when it was made for these photos as they are now; a clear error otherwise."""
    import json

    path = review_folder(workspace) / "review.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"no review at {path}; run clean.py --categories ... first") from None
    same_folder = record.get("images_dir") == str(options.images_dir.resolve())
    if not same_folder or record.get("categories") != list(options.categories):
        raise UserError(
            f"the review in {path.parent} is of {record.get('images_dir')} ({','.join(record.get('categories', []))}), "
            "not these photos; run clean.py with these options first"
        )
    if record.get("photos_fingerprint") != photos_fingerprint(options.images_dir, options.categories):
        raise UserError(
            f"the photos in {options.images_dir} changed since the review of {record.get('created')}, so its "
            "decisions may name the wrong photos; run clean.py again and review the new page"
        )
    return record


def parse_decisions(text: str, images_dir: Path, categories: tuple[str, ...], source: str) -> dict:
    """A decisions.csv (file,decision,category) checked whole: nothing is recorded unless every line is valid."""
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or [name.strip() for name in rows.fieldnames[:3]] != list(DECISION_FIELDS):
        raise UserError(
            f"{source} must start with the header line 'file,decision,category' (as review.html saves it)"
        )
    photos = photo_files(images_dir, categories)
    chosen: dict[str, set | dict] = {"keep": set(), "exclude": set(), "move": {}}
    for number, row in enumerate(rows, 2):
        decision, category = (row.get("decision") or "").strip(), (row.get("category") or "").strip()
        try:
            relative = normalize(row.get("file") or "")
        except UserError as error:
            raise UserError(f"{source} line {number}: {error}") from None
        if relative not in photos:
            raise UserError(
                f"{source} line {number}: no photo {relative!r} in {images_dir}; fix the line or review again"
            )
        if decision not in DECISIONS:
            raise UserError(
                f"{source} line {number}: decision {decision!r} is not one of {', '.join(DECISIONS)}"
            )
        if decision == "move" and category not in categories:
            raise UserError(
                f"{source} line {number}: {category!r} is not a category ({','.join(categories)}); move to one of them"
            )
        if decision == "move" and category != photos[relative]:
            chosen["move"][relative] = category
        elif decision == "move":
            chosen["keep"].add(relative)
        else:
            chosen[decision].add(relative)
    return chosen


def apply_decisions(text: str, options: CleanOptions, workspace: Workspace, source: str) -> str:
    """Check a decisions file against the current review and the photos, then record it; returns a summary."""
    current_review(workspace, options)
    chosen = parse_decisions(text, options.images_dir, options.categories, source)
    merged = record_decisions(
        options.images_dir, exclude=chosen["exclude"], relabel=chosen["move"], keep=chosen["keep"]
    )
    write_atomic(review_folder(workspace) / "decisions.csv", text.encode())
    return (
        f"Recorded {len(chosen['exclude'])} excluded, {len(chosen['move'])} moved, {len(chosen['keep'])} kept: "
        f"{len(merged.excluded)} photos excluded and {len(merged.relabeled)} relabeled in all "
        f"({options.images_dir / EXCLUDE_FILE}, {options.images_dir / RELABEL_FILE}); the photos are untouched"
    )


def apply_auto(review: Review, options: CleanOptions) -> str:
    """Exclude every photo flagged as a wrong label or off-topic past the thresholds the data gave."""
    chosen = {f.file for f in review.flags if f.issue in ("label", "off-topic")}
    merged = record_decisions(options.images_dir, exclude=chosen)
    by_issue = Counter(f.issue for f in review.flags if f.issue != "duplicate")
    return (
        f"--apply auto excluded {len(chosen)} photos ({by_issue['label']} likely wrong labels, "
        f"{by_issue['off-topic']} off-topic below the fence {review.thresholds['off_topic_score_below']}); "
        f"{len(merged.excluded)} are excluded in all, listed in {options.images_dir / EXCLUDE_FILE} (delete a line to "
        "bring a photo back); duplicates are left to the review"
    )


def _is_current(workspace: Workspace, options: CleanOptions) -> bool:
    try:
        current_review(workspace, options)
    except UserError:
        return False
    return True


def run_clean(
    options: CleanOptions,
    workspace: Workspace,
    decisions: Path | None = None,
    apply: str | None = None,
    serve: bool = False,
    port: int = 0,
    print_fn: PrintFn = print,
) -> None:
    """The stage: record a decisions file; or rank the photos, write the review, apply it (auto) or serve it."""
    if decisions is not None:
        try:
            text = Path(decisions).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(
                f"cannot read --decisions {decisions}: {error}; give the decisions.csv the page saved"
            ) from None
        print_fn(apply_decisions(text, options, workspace, str(decisions)))
        return
    if serve and apply is None and _is_current(workspace, options):
        print_fn(f"Serving the review in {review_folder(workspace)} (it is of these photos as they are now)")
    else:
        review = rank_photos(options, workspace, print_fn)
        write_review(review, options, workspace, print_fn)
        if apply == "auto":
            print_fn(apply_auto(review, options))
    if serve:
        from .review_page import serve as serve_page

        def record(text: str) -> str:
            return apply_decisions(text, options, workspace, "the saved decisions")

        serve_page(review_folder(workspace) / "review.html", record, port, print_fn)


def read_review(workspace: Workspace) -> tuple[dict, list[dict]] | None:
    """The last review (review.json and the rows of review.csv), or None when clean.py has not run."""
    import json

    folder = review_folder(workspace)
    try:
        record = json.loads((folder / "review.json").read_text(encoding="utf-8"))
        with open(folder / "review.csv", newline="", encoding="utf-8") as handle:
            return record, list(csv.DictReader(handle))
    except (OSError, ValueError):
        return None


def format_review(record: dict, rows: list[dict], top: int = 10) -> str:
    """The ranking as text: what was reviewed, then the first `top` photos of each issue."""
    from .text import column_width, pad

    lines = [f"Review of {record['photos']} photos in {record['images_dir']} ({record['created']}): " + ", ".join(
        f"{record['flagged'].get(issue, 0)} {issue}" for issue in ISSUES)]  # fmt: skip
    width = column_width("file", *(row["file"] for row in rows))
    for issue in ISSUES:
        mine = [row for row in rows if row["issue"] == issue][:top]
        if mine:
            lines += ["", f"{issue}:", f"  {'rank':>4}  {pad('file', width)}  given -> suggested  score"]
            lines += [
                f"  {row['rank']:>4}  {pad(row['file'], width)}  {row['given']} -> {row['suggested']}  {row['score']}"
                for row in mine
            ]
    return "\n".join(lines)
