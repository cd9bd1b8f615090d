"""The training stage as users run it: the run folder, the printed report, every option, bad input."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import pickle
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ANIMALS,
    ROOT,
    SHARED_WEIGHTS,
    cosine_rates,
    logged_learning_rates,
    make_image_folders,
    run_script,
    tree_digest,
)
from training_runs import RUN_FILES, quiet

from image_classifier.config import Workspace
from image_classifier.training.config import TrainConfig
from image_classifier.training.loop import train


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Three generated categories of 20 photos: 16 train, 2 validation and 2 test each."""
    return make_image_folders(tmp_path / "images", {"red": 20, "blue": 20, "green": 20})


def test_cnn_run_folder_is_complete_and_readable(images, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    lines: list[str] = []
    config = TrainConfig(
        categories=("red", "blue", "green"),
        images_dir=images,
        model="cnn",
        image_size=32,
        epochs=3,
        workers=1,
    )
    run = train(config, workspace, print_fn=lambda *parts: lines.append(" ".join(map(str, parts))))

    assert {p.name for p in run.iterdir()} >= RUN_FILES
    assert (workspace.runs / "latest").resolve() == run.resolve()
    assert run.name.endswith("-cnn")
    assert json.loads((run / "labels.json").read_text()) == ["red", "blue", "green"]
    history = pickle.loads((run / "history.pickle").read_bytes())
    assert isinstance(history, dict) and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert len(history["loss"]) == 3
    assert json.loads((run / "history.json").read_text()) == history
    config_json = json.loads((run / "config.json").read_text())
    assert config_json["options"]["image_size"] == 32 and config_json["options"]["model"] == "cnn"
    assert config_json["options"]["weights"] == "none" and config_json["options"]["dropout"] == 0.5
    versions = config_json["versions"]
    assert versions["python"] == platform.python_version()
    for package in ("keras", "numpy"):
        assert versions[package] == metadata.version(package)
    # TensorFlow is installed as tensorflow or (Linux x86_64 wheels) tensorflow-cpu: whichever is, is recorded
    for package in ("tensorflow", "tensorflow-cpu"):
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = None
        assert versions.get(package) == installed, package
    tensorflow = sys.modules["tensorflow"]  # imported by the training above
    assert tensorflow.__version__ in {versions.get("tensorflow"), versions.get("tensorflow-cpu")}
    assert len(config_json["data"]["fingerprint"]) == 64
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_count"] == 6 and set(metrics["per_class"]) == {"red", "blue", "green"}
    assert np.array(metrics["confusion_matrix"]["matrix"]).sum() == 6
    assert list((run / "logs" / "train").glob("events.out.tfevents.*"))
    text = "\n".join(lines)
    assert re.search(r"^Test loss: \d+\.\d+$", text, re.M)
    assert re.search(r"^Test accuracy: \d\.\d+$", text, re.M)
    assert re.search(rf"^Run saved to: {re.escape(str(run))}$", text, re.M)
    assert "precision" in text and "recall" in text


def test_mlp_learns_the_generated_colours(images, tmp_path):
    config = TrainConfig(
        categories=("red", "blue", "green"), images_dir=images, model="mlp", image_size=16, workers=1
    )
    run = train(config, Workspace(tmp_path / "ws"), print_fn=quiet)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 5 / 6


def test_transfer_learning_with_every_option(images, tmp_path, keras_home):
    workspace = Workspace(tmp_path / "ws")
    lines: list[str] = []
    config = TrainConfig(
        categories=("red", "blue", "green"),
        images_dir=images,
        model="mobilenet_v2",
        image_size=96,
        epochs=2,
        batch_size=8,
        optimizer="sgd",
        learning_rate=0.01,
        lr_schedule="cosine",
        dropout=0.1,
        dense_units=(16,),
        l2=1e-4,
        augment=True,
        fine_tune_layers=10,
        fine_tune_epochs=2,
        early_stopping=0,
        class_weight="auto",
        seed=3,
        resize="pad",
        workers=1,
    )
    run = train(config, workspace, print_fn=lambda *parts: lines.append(" ".join(map(str, parts))))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["fine_tune_start_epoch"] == 2
    assert metrics["training"]["epochs_run"] == 4
    assert len(pickle.loads((run / "history.pickle").read_bytes())["loss"]) == 4
    text = "\n".join(lines)
    assert "Phase 2: fine-tuning the top 10 backbone layers" in text
    assert "Phase 1: training the head on the frozen backbone" in text, "augmentation trains on the images"
    assert "on cached features" not in text
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["fine_tune_learning_rate"] == pytest.approx(0.001)
    assert options["resize"] == "pad" and options["augment"] is True
    np.testing.assert_allclose(
        logged_learning_rates(run), cosine_rates(0.01, 2) + cosine_rates(0.001, 2), rtol=1e-6, atol=1e-9
    )


def test_cached_features_and_weights_from_a_file(images, tmp_path):
    weights = next(SHARED_WEIGHTS.glob("*_224_no_top.h5"))
    lines: list[str] = []
    config = TrainConfig(
        categories=("red", "blue", "green"),
        images_dir=images,
        image_size=96,
        epochs=25,
        weights=str(weights),
        quality="best",
        fine_tune_epochs=1,
        workers=1,
    )
    run = train(
        config, Workspace(tmp_path / "ws"), print_fn=lambda *parts: lines.append(" ".join(map(str, parts)))
    )
    text = "\n".join(lines)
    assert "Phase 1: computing mobilenet_v2 features once for 54 images" in text
    assert "photos randomly augmented" in text, "--quality best augments the fine-tuning phase only"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 5 / 6
    assert json.loads((run / "config.json").read_text())["options"]["weights"] == str(weights)


@pytest.fixture
def workspace_with_history(images, tmp_path) -> Path:
    """A workspace that already holds a run and a dataset, to prove errors leave it alone."""
    root = tmp_path / "ws"
    (root / "runs" / "20250101-000000-cnn").mkdir(parents=True)
    (root / "runs" / "20250101-000000-cnn" / "model.keras").write_bytes(b"earlier work")
    (root / "datasets" / "old").mkdir(parents=True)
    (root / "datasets" / "old" / "dataset.json").write_text("{}")
    return root


BAD_INPUTS = [
    (["--categories", "red,blue", "--model", "cnn", "--quality", "best"], "preset for pretrained backbones"),
    (["--categories", "red"], "at least 2 categories"),
    (["--categories", "red,../blue"], "bad category name: '../blue' starts with a dot"),
    (["--categories", "red,a/b"], "which a folder name cannot"),
    (["--categories", "red,purple"], "no folder for category 'purple'"),
    (["--categories", "red,blue", "--model", "alexnet"], "invalid choice: 'alexnet'"),
    (
        ["--categories", "red,blue", "--model", "inception_v3", "--image-size", "64"],
        "inception_v3 cannot take 64x64",
    ),
    (
        ["--categories", "red,blue", "--weights", "/no/such/file.h5"],
        "weights file /no/such/file.h5 does not exist",
    ),
    (["--categories", "red,blue", "--model", "cnn", "--weights", "imagenet"], "learns from scratch"),
    (["--categories", "red,blue", "--dropout", "1.5"], "--dropout"),
    (["--categories", "red,blue", "--batch-norm"], "mobilenet_v2 has none"),
    (["--categories", "red,blue", "--split", "0.9,0.1"], "three"),
    (["--categories", "red,empty"], "is empty"),
    (["--categories", "red,few"], "only 3 usable images"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(images, workspace_with_history, tmp_path, args, message):
    (images / "empty").mkdir()
    make_image_folders(images, {"x": 0, "y": 0, "few": 3})
    before = tree_digest(workspace_with_history)
    result = run_script(
        "machine_learning.py", *args, "--images-dir", str(images), "--workspace", str(workspace_with_history),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert message in errors[0]
    if "usable" not in message:  # everything else is caught before any image is decoded
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_digest(workspace_with_history) == before


def test_unreadable_weights_file(images, workspace_with_history, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"this is not HDF5")
    before = tree_digest(workspace_with_history)
    result = run_script(
        "machine_learning.py", "--categories", "red,blue", "--image-size", "96", "--weights", str(broken),
        "--images-dir", str(images), "--workspace", str(workspace_with_history), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"could not load weights file {broken}" in error_lines[0]
    assert not list((workspace_with_history / "runs").glob("*-mobilenet_v2"))
    assert tree_digest(workspace_with_history).items() >= before.items()


def test_missing_imagenet_weights_name_the_file_and_the_way_out(images, tmp_path):
    empty_home = tmp_path / "keras-home"
    empty_home.mkdir()
    result = run_script(
        "machine_learning.py", "--categories", "red,blue", "--image-size", "128", "--images-dir", str(images),
        "--workspace", str(tmp_path / "ws"), cwd=tmp_path,
        # a closed local port: the download fails at once, through Keras's real loader
        env={"KERAS_HOME": str(empty_home), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"},
    )  # fmt: skip
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5" in error[0]
    assert str(empty_home / "models") in error[0] and "--weights PATH" in error[0]
    assert not (tmp_path / "ws" / "runs").exists()


def test_the_readme_table_and_help_name_the_same_options(tmp_path):
    """The README's training table and --help (made from TrainConfig's declarations) list the same flags."""
    result = run_script("machine_learning.py", "--help", cwd=tmp_path)
    assert result.returncode == 0
    in_help = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", result.stdout, re.MULTILINE)) - {
        "--help",
        "--workspace",
    }
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## 3. Train") : readme.index("## 4. ")]
    rows = [re.split(r"(?<!\\)\|", line)[1] for line in section.splitlines() if line.startswith("| `--")]
    in_readme = {flag for row in rows for flag in re.findall(r"--[a-z][a-z0-9-]*", row)} - {"--no-batch-norm"}
    assert in_help == in_readme
    assert len(in_help) >= 25
    assert "efficientnet_v2_s" in result.stdout and "convnext_tiny" in result.stdout


def test_help_and_bad_options_never_import_tensorflow(tmp_path):
    """--help and the argument checks answer in a fraction of a second: TensorFlow is imported only to train."""
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['machine_learning.py', *sys.argv[1:]]\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / 'machine_learning.py')!r}, run_name='__main__')\n"
        "except SystemExit as end:\n"
        "    print('exit', end.code, 'tensorflow' in sys.modules)\n"
    )
    for args, code in (
        (["--help"], 0),
        (["--categories", "a,b", "--dropout", "2"], 2),
        (["--model", "x"], 2),
    ):
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.stdout.strip().splitlines()[-1] == f"exit {code} False", result.stderr


def test_help_defaults_come_from_the_model_registry(tmp_path):
    from image_classifier.models import REGISTRY

    result = run_script("machine_learning.py", "--help", cwd=tmp_path)
    text = " ".join(result.stdout.split())
    cnn = REGISTRY["cnn"]
    assert f"{cnn.dropout:g} for cnn" in text and f"{cnn.epochs} for mlp and cnn" in text
    assert f"{REGISTRY['mobilenet_v2'].default_image_size} for mobilenet_v2" in text


def test_workspace_comes_from_the_environment(images, tmp_path):
    result = run_script(
        "machine_learning.py", "--categories", "red,blue,green", "--model", "mlp", "--image-size", "16",
        "--epochs", "2", "--images-dir", str(images), cwd=tmp_path, env={"WORKSPACE": str(tmp_path / "from-env")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-env" / "runs" / "latest" / "model.keras").is_file()


def test_config_file_trains_again_and_the_command_line_overrides_it(images, tmp_path):
    workspace = tmp_path / "ws"
    first = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--categories", "red,blue,green", "--model", "mlp",
        "--image-size", "16", "--epochs", "2", "--dropout", "0.1", "--images-dir", str(images), cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    saved = workspace / "runs" / "latest" / "config.json"
    original = json.loads(saved.read_text())["options"]
    again = run_script(
        "machine_learning.py",
        "--workspace",
        str(workspace),
        "--config",
        str(saved),
        "--epochs",
        "1",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    options = json.loads((workspace / "runs" / "latest" / "config.json").read_text())["options"]
    assert options == {**original, "epochs": 1}
    assert original["dropout"] == 0.1 and original["model"] == "mlp"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"options": {**original, "learning_rat": 0.1}}))
    refused = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--config", str(bad), cwd=tmp_path
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: --config {bad} has options this version does not know: learning_rat; remove them"
    ]


def test_summary_prints_layers_and_draws_the_diagram(tmp_path):
    result = run_script(
        "summary.py", "--model", "cnn", "--image-size", "64", "--categories", "a,b,c", "--workspace", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "conv_4" in result.stdout and "Total params" in result.stdout
    diagram = tmp_path / "summaries" / "cnn.png"
    assert diagram.is_file() and diagram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", result.stdout


@pytest.mark.slow
def test_default_command_on_real_photos(tmp_path):
    """The README's main job on 96 real photos of cats, dogs and horses, with the shared weights."""
    result = run_script(
        "machine_learning.py", "--categories", "cat,dog,horse", "--images-dir", str(ANIMALS),
        "--workspace", str(tmp_path / "ws"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"^Test accuracy: (\S+)$", result.stdout, re.M).group(1))
    assert accuracy >= 0.75, result.stdout  # chance is 0.33
    run = Path(re.search(r"^Run saved to: (.+)$", result.stdout, re.M).group(1))
    assert {p.name for p in run.iterdir()} >= RUN_FILES


def test_schedule_and_batch_norm_default_per_model_and_for_older_runs(tmp_path):
    common = {"categories": ("a", "b"), "images_dir": tmp_path}
    assert TrainConfig(model="cnn", **common).resolve().lr_schedule == "cosine"
    assert TrainConfig(model="mobilenet_v2", **common).resolve().lr_schedule == "constant"
    assert TrainConfig(model="mlp", lr_schedule="constant", **common).resolve().lr_schedule == "constant"
    options = TrainConfig(model="cnn", **common).resolve().options()
    assert TrainConfig.from_options(options).lr_schedule == "cosine"
    del options["lr_schedule"], options["batch_norm"]  # a config.json older than these options
    older = TrainConfig.from_options(options)
    assert older.lr_schedule == "constant" and older.batch_norm is False


def test_a_tiny_folder_still_trains_the_head_to_convergence(tmp_path, keras_home):
    """8 photos per category and --epochs 3 are 3 optimizer steps of one batch: the head gets enough steps."""
    images = make_image_folders(tmp_path / "images", {"red": 8, "blue": 8})
    lines: list[str] = []
    config = TrainConfig(
        categories=("red", "blue"), images_dir=images, image_size=96, epochs=3, engine="keras", workers=1
    )
    run = train(
        config, Workspace(tmp_path / "ws"), print_fn=lambda *parts: lines.append(" ".join(map(str, parts)))
    )
    output = "\n".join(lines)
    passes = int(re.search(r"passes over them (\d+) times", output).group(1))
    assert passes > 1
    history = pickle.loads((run / "history.pickle").read_bytes())
    chance = np.log(2)  # the loss of a 2-category head that has learned nothing
    assert len(history["loss"]) == 3, "--epochs keeps its meaning"
    assert history["loss"][-1] < chance / 10 and history["accuracy"][-1] == 1.0


def test_quality_presets_fill_only_the_options_left_unset():
    common = {"categories": ("a", "b"), "images_dir": Path("images")}
    assert TrainConfig(**common).resolve().fine_tune_epochs == 0
    assert TrainConfig(quality="best", **common).resolve().fine_tune_epochs == 5
    assert TrainConfig(quality="best", fine_tune_epochs=1, **common).resolve().fine_tune_epochs == 1
    assert TrainConfig(quality="fast", **common).resolve().image_size == 160
    assert TrainConfig(quality="fast", image_size=96, **common).resolve().image_size == 96
