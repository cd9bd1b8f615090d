"""The tuning stage: a KerasTuner search over the head and the feature options, on cached backbone features.

tuning/<YYYYmmdd-HHMMSS>/
    search.json      the search's options (what --resume continues with)
    trials/          KerasTuner's own project: oracle.json, trial_<id>/trial.json and checkpoints
    logs/            TensorBoard: one folder per trial, its curves and its hyperparameters (HParams)
    best.json        the best trial as training options ({"options": ...}, what --config reads) and scores

A trial trains only the head, on features computed once per (image size, layers, views) through
features.py; the objective is the validation loss. The test split is touched once, at the end: the best
trial's options are trained through the real training path (training.loop), so its test accuracy is the
one `scripts/machine_learning.py --config best.json` gives.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from . import cli
from .atomic import write_json
from .config import Workspace
from .errors import UserError
from .models import DEFAULT_MODEL, REGISTRY
from .options import Declaration, as_json, coerce, declared, shown
from .preprocess import (
    CATEGORIES,
    DEDUPE,
    DEFAULT_RESIZE,
    DEFAULT_SPLIT,
    IMAGE_SIZE,
    IMAGES_DIR,
    RESIZE,
    SPLIT,
    WORKERS,
    PreprocessOptions,
)
from .text import column_width, pad
from .training.config import TrainConfig
from .tuning_space import LAYER_PRESETS, SearchSpace, layer_choices_arg, sizes_arg, trial_config, views_arg

PrintFn = Callable[..., None]
TUNERS = ("bayesian", "hyperband")
DEFAULT_TUNER = "bayesian"
"""Chosen by bench/tune_trashnet.py --tuners bayesian,hyperband (docs/tuning.md has the numbers)."""
RESUME_KEEPS = frozenset({"trials", "max_minutes", "workers"})
"""Options a resumed search may take from the new command line; the others are the search's own."""
BEST_SHOWN = 10


def _search(help: str, **kwargs) -> Declaration:
    return Declaration(help, group="search", **kwargs)


def _training_declaration(name: str) -> Declaration:
    """A training option's own declaration, for an option the search passes on to training unchanged."""
    (item,) = [item for item in dataclasses.fields(TrainConfig) if item.name == name]
    return replace(item.metadata["declaration"], group="search")


@dataclass(frozen=True)
class TuneOptions:
    """Every option of a search; the data options are preprocessing's own declarations."""

    categories: tuple[str, ...] = declared(CATEGORIES)
    images_dir: Path = declared(IMAGES_DIR)
    model: str = declared(
        _search(
            "the pretrained backbone whose cached features the heads train on",
            choices=tuple(name for name, spec in REGISTRY.items() if spec.pretrained),
            metavar="NAME",
        ),
        DEFAULT_MODEL,
    )
    image_size: tuple[int, ...] | None = declared(
        replace(
            IMAGE_SIZE,
            help="side in pixels; several, like 160,224, are searched (features computed once per size)",
            type=sizes_arg,
            metavar="N,N",
            default_text="the model's own, 224 for mobilenet_v2",
        ),
        None,
    )
    feature_layers: tuple[tuple[str, ...], ...] | None = declared(
        _search(
            "backbone layer lists to try, separated by /, like final/block_13_expand_relu,final",
            type=layer_choices_arg,
            metavar="LAYERS/LAYERS",
            default_text="final, and four depths for mobilenet_v2",
        ),
        None,
    )
    feature_views: tuple[int, ...] = declared(
        _search("numbers of views of each training photo to try (see machine_learning.py --help)",
                type=views_arg, metavar="N,N"),
        (1, 2),
    )  # fmt: skip
    epochs: int | None = declared(
        _search(
            "most epochs of each trial and of the final training; early stopping may end sooner",
            type=cli.positive_int,
            metavar="N",
            default_text="the model's own, 20 for backbones",
        ),
        None,
    )
    trials: int = declared(_search("configurations to try", type=cli.positive_int, metavar="N"), 30)
    max_minutes: float = declared(
        _search(
            "stop starting trials when the next would end after this many minutes from the start; the best "
            "so far is then trained and saved, and --resume continues",
            type=cli.positive_float,
            metavar="M",
        ),
        15.0,
    )
    tuner: str = declared(
        _search(
            "KerasTuner's search algorithm (bayesian measured better here: docs/tuning.md)", choices=TUNERS
        ),
        DEFAULT_TUNER,
    )
    engine: str | None = declared(_training_declaration("engine"), None)
    resize: str = declared(RESIZE, DEFAULT_RESIZE)
    split: tuple[float, float, float] = declared(SPLIT, DEFAULT_SPLIT)
    seed: int = declared(
        Declaration("for the split, the search and the heads' weights", group="data", type=int), 0
    )
    dedupe: str = declared(DEDUPE, "exact")
    workers: int = declared(WORKERS, 0, compare=False)

    def space(self) -> SearchSpace:
        spec = REGISTRY[self.model]
        layers = self.feature_layers or LAYER_PRESETS.get(self.model, (spec.feature_layers,))
        return SearchSpace(
            image_sizes=tuple(self.image_size or (spec.default_image_size,)),
            feature_layers=tuple(tuple(names) for names in layers),
            feature_views=tuple(self.feature_views),
        )

    def base_config(
        self, image_size: int, layers: tuple[str, ...] = ("final",), views: int = 1
    ) -> TrainConfig:
        """The training options every trial shares, at one point of the feature options."""
        data = {item.name: getattr(self, item.name) for item in dataclasses.fields(PreprocessOptions)}
        return TrainConfig(
            **{**data, "image_size": image_size},
            model=self.model,
            epochs=self.epochs,
            engine=self.engine,
            feature_layers=layers,
            feature_views=views,
        ).resolve()

    def check(self) -> None:
        """Every point of the search space is a configuration training accepts (before any slow work)."""
        space = self.space()
        for size, layers in space.combinations():
            for views in space.feature_views:
                self.base_config(size, layers, views)

    def preprocess_options(self, image_size: int) -> PreprocessOptions:
        return self.base_config(image_size).preprocess_options()


def tune(
    options: TuneOptions, workspace: Workspace, print_fn: PrintFn = print, folder: Path | None = None
) -> Path:
    """Run (or, given its folder, continue) a search, train its best configuration, write best.json."""
    started = time.monotonic()
    options.check()
    from .tf_env import import_keras

    import_keras()
    store = FeatureStore(options, workspace, print_fn)
    store.build_backbones()  # bad layer names fail here, before anything is written
    if folder is None:
        folder = _new_folder(workspace, options)
        print_fn(f"Search folder: {folder}")
    tuner = _make_tuner(options, store, folder, Progress(options, started, print_fn))
    try:
        tuner.search(
            verbose=0,
            callbacks=[import_keras().callbacks.TensorBoard(log_dir=str(folder / "logs"), write_graph=False)],
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"search stopped; continue it with: python scripts/tune.py --resume {folder.name}"
        ) from None
    return finish_search(tuner, options, store, folder, workspace, print_fn)


def _new_folder(workspace: Workspace, options: TuneOptions) -> Path:
    """tuning/<timestamp>/ with search.json; never an existing folder."""
    workspace.tuning.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        folder = workspace.tuning / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        write_json(
            folder / "search.json",
            {"options": as_json(options), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )
        return folder
    raise UserError(f"could not create a new search folder in {workspace.tuning}")


def find_search(workspace: Workspace, name: str) -> Path:
    """`latest` (the newest search), a folder name in tuning/, or a path -> the search folder."""
    if name == "latest":
        found = (
            sorted(path for path in workspace.tuning.glob("*/search.json"))
            if workspace.tuning.is_dir()
            else []
        )
        if not found:
            raise UserError(f"no search in {workspace.tuning} to resume; start one without --resume")
        return found[-1].parent
    for candidate in (Path(name), workspace.tuning / name):
        if (candidate / "search.json").is_file():
            return candidate
    raise UserError(
        f"no search folder {name} (looked for search.json in {name} and in {workspace.tuning / name})"
    )


def resume_search(workspace: Workspace, name: str, given: dict, print_fn: PrintFn = print) -> Path:
    """Continue a stopped search with its own options (`given`: the options typed now, which must agree)."""
    folder = find_search(workspace, name)
    options = _resumed_options(folder, given)
    done = _completed_trials(folder)
    if done >= options.trials and (folder / "best.json").is_file():
        raise UserError(
            f"search {folder.name} has run its {done} trials already; give --trials N (more than {done}) to "
            "continue it, or train its best with scripts/machine_learning.py --config "
            f"{folder / 'best.json'}"
        )
    print_fn(f"Resuming search {folder} after {done} finished trials")
    return tune(options, workspace, print_fn, folder=folder)


def _completed_trials(folder: Path) -> int:
    count = 0
    for path in (folder / "trials").glob("trial_*/trial.json"):
        try:
            count += json.loads(path.read_text(encoding="utf-8")).get("status") == "COMPLETED"
        except (OSError, ValueError):
            continue
    return count


def _resumed_options(folder: Path, given: dict) -> TuneOptions:
    """The search's own options; options typed now must agree with them, but for RESUME_KEEPS."""
    try:
        saved = TuneOptions(
            **coerce(TuneOptions, json.loads((folder / "search.json").read_text())["options"])
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot resume {folder}: its search.json is unreadable ({error})") from None
    differing = [
        f"--{key.replace('_', '-')} {shown(value)} (the search has {shown(getattr(saved, key))})"
        for key, value in given.items()
        if key not in RESUME_KEEPS and _plain(value) != _plain(getattr(saved, key))
    ]
    if differing:
        raise UserError(
            f"--resume continues {folder.name} with its own options, but this command asks for "
            f"{'; '.join(differing)}; drop those options, or start a new search without --resume"
        )
    return replace(saved, **{key: value for key, value in given.items() if key in RESUME_KEEPS})


def _plain(value):
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    return str(value) if isinstance(value, Path) else value


class FeatureStore:
    """The prepared arrays per image size and the cached backbone features per (size, layers, views)."""

    def __init__(self, options: TuneOptions, workspace: Workspace, print_fn: PrintFn):
        self.options, self.workspace, self.print_fn = options, workspace, print_fn
        self.space = options.space()
        self.backbones: dict[tuple[int, tuple[str, ...]], object] = {}
        self._datasets: dict[int, object] = {}
        self._features: dict[tuple, tuple] = {}

    def build_backbones(self) -> None:
        """Each (size, layers)'s frozen feature model, built once: a layer it does not have fails here."""
        from .models import build_model

        classes = len(self.options.categories)
        for size, layers in self.space.combinations():
            config = self.options.base_config(size, layers)
            built = build_model(config.spec, classes, size, resize=config.resize, weights=config.weights,
                                feature_layers=layers)  # fmt: skip
            self.backbones[size, layers] = built.features

    def dataset(self, size: int):
        from .preprocess import prepare_dataset

        if size not in self._datasets:
            self._datasets[size] = prepare_dataset(
                self.options.preprocess_options(size), self.workspace, print_fn=self.print_fn
            )
        return self._datasets[size]

    def features(self, size: int, layers: tuple[str, ...], views: int) -> tuple:
        """(train features, train labels, validation features, validation labels), computed once."""
        import numpy as np

        from .features import BackboneFeatures

        key = (size, tuple(layers), views)
        if key not in self._features:
            dataset, seed = self.dataset(size), self.options.seed
            source = BackboneFeatures(self.backbones[size, tuple(layers)], self.options.model, size,
                                      self.workspace, self.options.engine, self.print_fn, layers=tuple(layers))  # fmt: skip
            train = [source.of_split(dataset, "train", view=view, seed=seed) for view in range(views)]
            y_train, y_validation = dataset.arrays("train")[1], dataset.arrays("validation")[1]
            self._features[key] = (
                np.concatenate(train) if views > 1 else np.asarray(train[0]),
                np.concatenate([y_train] * views),
                np.asarray(source.of_split(dataset, "validation")),
                np.asarray(y_validation),
            )
            self.print_fn(source.summary())
        return self._features[key]


class Progress:
    """One line per trial: its score, the best so far, trials left, and the time left of --max-minutes."""

    def __init__(self, options: TuneOptions, started: float, print_fn: PrintFn):
        self.trials, self.budget = options.trials, options.max_minutes * 60
        self.started, self.print_fn = started, print_fn
        self.durations: list[float] = []
        self.trial_started = started
        self.stopped_early = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def begin(self) -> None:
        self.trial_started = time.monotonic()

    def end(self, trial, oracle) -> bool:
        """Report the trial; True when the next one and the final training (about a trial's time) would end
        after the time budget."""
        self.durations.append(time.monotonic() - self.trial_started)
        done = sum(1 for item in oracle.trials.values() if item.status == "COMPLETED")
        best = oracle.get_best_trials(1)
        score = "failed" if trial.score is None else f"val_loss {trial.score:.4f}"
        best_text = f"best {best[0].score:.4f} (trial {best[0].trial_id})" if best else "no best yet"
        mean = sum(self.durations) / len(self.durations)
        left = max(self.budget - self.elapsed(), 0.0)
        to_go = max(self.trials - len(oracle.trials), 0)
        self.print_fn(
            f"Trial {trial.trial_id} ({done}/{self.trials} done) in {self.durations[-1]:.1f}s: {score}; "
            f"{best_text}; {to_go} to go, ETA {_clock(min(mean * to_go, left))}, {_clock(left)} left of "
            "--max-minutes"
        )
        self.stopped_early = bool(to_go) and self.elapsed() + 2 * mean > self.budget  # a trial, the final run
        return self.stopped_early


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


@cache
def _classes():
    """The KerasTuner classes, made on first use (importing keras_tuner loads TensorFlow)."""
    import keras_tuner as kt

    from .tf_env import import_keras

    keras = import_keras()
    return (
        kt,
        _head_hypermodel(kt, keras),
        {"bayesian": with_budget(kt.BayesianOptimization), "hyperband": with_budget(kt.Hyperband)},
    )


def _head_hypermodel(kt, keras):
    class HeadHyperModel(kt.HyperModel):
        """A trial's head (models.build_head, as training builds it) on its features, compiled as training does."""

        def __init__(self, options: TuneOptions, store: FeatureStore):
            super().__init__()
            self.options, self.store = options, store

        def declare_hyperparameters(self, hp) -> None:
            self.store.space.declare(hp)

        def config(self, hp) -> TrainConfig:
            space = self.store.space
            base = self.options.base_config(space.image_sizes[0], space.feature_layers[0])
            return trial_config(base, hp.values)

        def build(self, hp):
            from .models import build_head
            from .training.loop import make_optimizer

            self.store.space.declare(hp)
            config = self.config(hp)
            keras.utils.set_random_seed(config.seed)
            x_train = self.store.features(config.image_size, config.feature_layers, config.feature_views)[0]
            several = tuple(config.feature_layers) != ("final",)
            head = build_head(keras, x_train.shape[1], len(config.categories), config.dense_units,
                              config.dropout, config.l2, standardize=several)  # fmt: skip
            if several:
                head.get_layer("standardize").set_statistics(x_train)
            steps = config.epochs * -(-len(x_train) // config.batch_size)
            head.compile(
                optimizer=make_optimizer(
                    keras, config.optimizer, config.learning_rate, config.lr_schedule, steps
                ),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"],
            )
            return head

        def fit(self, hp, model, *args, **kwargs):
            config = self.config(hp)
            x_train, y_train, x_val, y_val = self.store.features(
                config.image_size, config.feature_layers, config.feature_views
            )
            stopping = [keras.callbacks.EarlyStopping("val_loss", patience=config.early_stopping)]
            return model.fit(
                x_train, y_train, batch_size=config.batch_size, validation_data=(x_val, y_val), shuffle=True,
                epochs=kwargs.pop("epochs", config.epochs), initial_epoch=kwargs.pop("initial_epoch", 0),
                callbacks=kwargs.pop("callbacks", []) + (stopping if config.early_stopping else []),
                verbose=0,
            )  # fmt: skip

    return HeadHyperModel


def with_budget(base):
    """`base` (a KerasTuner tuner class) reporting each trial and keeping to --max-minutes."""

    class BudgetedTuner(base):
        """Stops starting trials when the next would overrun --max-minutes, and reports each trial."""

        progress: Progress

        def on_trial_begin(self, trial):
            super().on_trial_begin(trial)
            self.progress.begin()

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if self.progress.end(trial, self.oracle):
                self.oracle.max_trials = len(self.oracle.trials)  # not saved: --resume has the full count

    return BudgetedTuner


def _make_tuner(options: TuneOptions, store: FeatureStore, folder: Path, progress: Progress):
    kt, HeadHyperModel, tuners = _classes()
    common = {
        "hypermodel": HeadHyperModel(options, store),
        "objective": kt.Objective("val_loss", "min"),
        "seed": options.seed,
        "directory": str(folder),
        "project_name": "trials",
        "overwrite": False,
    }
    epochs = options.base_config(store.space.image_sizes[0]).epochs
    if options.tuner == "hyperband":
        tuner = tuners["hyperband"](max_epochs=epochs, factor=3, **common)
        tuner.oracle.max_trials = options.trials
    else:
        tuner = tuners["bayesian"](
            max_trials=options.trials, num_initial_points=max(3, options.trials // 3), **common
        )
    tuner.progress = progress
    return tuner


def finish_search(
    tuner, options: TuneOptions, store: FeatureStore, folder: Path, workspace: Workspace, print_fn: PrintFn
) -> Path:
    """The table of the best trials, the best one trained for real (the one use of the test split), best.json."""
    from .runs import RunFolder
    from .training.loop import train_on_dataset

    best = tuner.oracle.get_best_trials(BEST_SHOWN)
    if not best:
        raise UserError(f"no trial of {folder} finished; see the errors in {folder / 'trials'}")
    print_fn(best_table(best))
    done = sum(1 for trial in tuner.oracle.trials.values() if trial.status == "COMPLETED")
    if tuner.progress.stopped_early:
        print_fn(
            f"Stopped after {done} of {options.trials} trials: the next would end after --max-minutes "
            f"{shown(options.max_minutes)}; continue with: python scripts/tune.py --resume {folder.name}"
        )
    config = tuner.hypermodel.config(best[0].hyperparameters)
    print_fn(
        f"Training the best configuration (trial {best[0].trial_id}) for real; the test split is used now"
    )
    dataset = store.dataset(config.image_size)
    run = RunFolder(train_on_dataset(config, dataset, workspace, print_fn=print_fn))
    record = {
        "options": run.options,
        "search": {"folder": str(folder), "tuner": options.tuner, "trials": done,
                   "best_trial": best[0].trial_id, "validation_loss": best[0].score},
        "run": {"name": run.name, "validation_loss": run.metrics["training"]["best_validation"].get("val_loss"),
                "test_accuracy": run.metrics["test_accuracy"]},
    }  # fmt: skip
    write_json(folder / "best.json", record)
    print_fn(
        f"Search done: {done} trials, best val_loss {best[0].score:.4f} (trial {best[0].trial_id}); trained as "
        f"{run.name}: test accuracy {run.metrics['test_accuracy']:.4f}. Train it again with: python "
        f"scripts/machine_learning.py --config {folder / 'best.json'}"
    )
    return folder / "best.json"


COLUMNS = ("learning_rate", "optimizer", "lr_schedule", "dropout", "dense_units", "l2", "batch_size",
           "image_size", "feature_layers", "feature_views")  # fmt: skip


def best_table(trials: list) -> str:
    """The best trials, best first: score, best epoch and each hyperparameter, lined up by display width."""
    header = ["#", "trial", "val_loss", "epoch", *COLUMNS]
    rows = [header]
    for rank, trial in enumerate(trials, start=1):
        values = trial.hyperparameters.values
        layers = str(values.get("feature_layers", ""))
        rows.append([
            str(rank), trial.trial_id, f"{trial.score:.4f}", str((trial.best_step or 0) + 1),
            *(_cell(values.get(name)) if name != "feature_layers" else _short_layers(layers) for name in COLUMNS),
        ])  # fmt: skip
    widths = [column_width(*(row[index] for row in rows)) for index in range(len(header))]
    lines = [
        "  ".join(pad(cell, width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return f"Best {len(trials)} trials (lowest validation loss first):\n" + "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _short_layers(text: str) -> str:
    names = text.split(",")
    return text if len(names) == 1 else f"{len(names)} depths"
