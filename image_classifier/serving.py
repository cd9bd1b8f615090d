"""Serve a trained run over HTTP: a page to try photos in a browser, and an API for other programs.

GET /          the page (static/serve.html: plain HTML and JavaScript, nothing fetched from elsewhere)
GET /health    the run, its labels, the finished runs the page can switch to
POST /predict  multipart photos, or JSON {"url": ...}: the JSON `predict.py --json` prints

The model loads once per run and stays loaded; requests that arrive together go through it as one batch
(Batcher), and a backbone's features come from the fast engine as in predict.py. Photos are decoded by
images.py, as everywhere else, and held in memory only: nothing reaches the workspace unless
--keep-uploads. Every bad request ends in a 4xx with one line saying why, and the server goes on.

The standard library's ThreadingHTTPServer is enough here: one thread per connection, each decoding its
own photos beside the others, and one model thread per run. It needs no new dependency, and nothing in it
is hidden: the whole request path is in this file.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import io
import ipaddress
import json
import os
import queue
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from email import policy as email_policy
from email.parser import BytesParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .atomic import write_atomic
from .cli import names_arg, non_negative_int, positive_float, positive_int, probability_arg
from .config import Workspace
from .errors import UserError
from .gathering.download import Cancelled, FetchError, FetchFailure, FetchPolicy, HttpClient
from .images import NOT_AN_IMAGE, ImageError, load_array
from .options import Declaration, declared
from .predict import DEFAULT_TOP_K, Prediction, Predictor, predictions_document
from .runs import RunFolder

DEFAULT_PORT = 8501
DEFAULT_MAX_MB = 10.0
MAX_BATCH = 32
BATCH_WINDOW = 0.01
"""Seconds the model thread waits for more requests after the first one, to batch them."""
MAX_LOADED_RUNS = 3
"""Runs kept in memory at once; the page can switch between more, the oldest is let go."""
MAX_REQUESTS = 16
"""Requests read and answered at once; more wait their turn, so memory stays under 16 x --max-mb."""
READ_TIMEOUT = 30.0
"""Seconds a client may take to send its request: a stalled upload must not hold a thread for ever."""
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
HEATMAP_SIZE = 224
"""Pixels a side of the photo a heatmap is drawn over (the model's own input may be much smaller)."""
MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart boundaries and headers around photos of up to --max-mb."""

SERVER = "serve"
RUN = Declaration("the run served first: latest, a folder name in WORKSPACE/runs, or a path", group=SERVER)
HOST = Declaration(
    "address to listen on; 0.0.0.0 is every network this machine is on (use --token then)", group=SERVER
)
PORT = Declaration("port to listen on (0: any free port)", group=SERVER, type=non_negative_int)
TOKEN = Declaration(
    "require the header `Authorization: Bearer TOKEN` (default: $SERVE_TOKEN when set, else none)",
    group=SERVER,
    metavar="TOKEN",
)
MAX_MB = Declaration(
    "largest request body or image download accepted, in MB", group=SERVER, type=positive_float, metavar="MB"
)
KEEP_UPLOADS = Declaration(
    "save every photo received to WORKSPACE/uploads/ (default: nothing is written)",
    group=SERVER,
    action="flag",
)
TOP_K = Declaration("labels returned per photo", group=SERVER, type=positive_int)
THRESHOLD = Declaration(
    "mark predictions whose top probability is below P as uncertain",
    group=SERVER,
    type=probability_arg,
    metavar="P",
)
ALLOW_NETWORKS = Declaration(
    "networks image URLs may lead into although they are not public, like 192.168.1.0/24",
    group=SERVER,
    type=names_arg,
    metavar="CIDR,...",
    default_text="public addresses only",
)


@dataclass(frozen=True)
class ServeOptions:
    run: str = declared(RUN, "latest")
    host: str = declared(HOST, "127.0.0.1")
    port: int = declared(PORT, DEFAULT_PORT)
    token: str | None = declared(TOKEN, None)
    max_mb: float = declared(MAX_MB, DEFAULT_MAX_MB)
    keep_uploads: bool = declared(KEEP_UPLOADS, False)
    top_k: int = declared(TOP_K, DEFAULT_TOP_K)
    threshold: float = declared(THRESHOLD, 0.0)
    allow_networks: tuple[str, ...] = declared(ALLOW_NETWORKS, ())

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


class RequestError(Exception):
    """A request that cannot be answered: its HTTP status and the one line the client reads."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Image URLs: no server-side request forgery.


class BlockedAddress(Exception):
    """A URL (or one of its redirects) leads to an address this server must not fetch from."""


@dataclass(frozen=True)
class AddressGuard:
    """Which addresses image URLs may reach: public ones, plus the networks the operator allowed.

    Checked on every connection the HTTP client opens, so each redirect hop is checked at the address it
    really connects to: the name is resolved and refused when any address is not allowed, and the socket's
    peer is checked again after connecting (a name that resolves differently the second time gains nothing).
    """

    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, networks: tuple[str, ...]) -> AddressGuard:
        try:
            return cls(tuple(ipaddress.ip_network(text, strict=False) for text in networks))
        except ValueError as error:
            raise UserError(f"--allow-networks: {error}; give networks like 192.168.1.0/24") from None

    def check(self, address: str, host: str) -> None:
        ip = ipaddress.ip_address(address.split("%")[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        ip = mapped or ip
        if any(ip in network for network in self.allowed):
            return
        if not ip.is_global or ip.is_multicast:
            kind = "loopback" if ip.is_loopback else "private or reserved"
            raise BlockedAddress(
                f"refused: {host} is at {ip}, a {kind} address; this server fetches image URLs from public "
                "addresses only (--allow-networks adds others)"
            )

    def resolve(self, host: str, port: int) -> set[str]:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return set()  # the connection fails on its own and says so
        addresses = {item[4][0] for item in found}
        for address in addresses:
            self.check(address, host)
        return addresses


def _guarded(base: type, guard: AddressGuard) -> type:
    class Guarded(base):
        def _new_conn(self):
            guard.resolve(self.host, self.port)
            sock = super()._new_conn()
            try:
                guard.check(sock.getpeername()[0], self.host)
            except BaseException:
                sock.close()
                raise
            return sock

    return Guarded


def guarded_session(guard: AddressGuard, user_agent: str):
    """A requests Session whose every connection goes through `guard`, and that ignores proxy variables
    (through a proxy, the address connected to would be the proxy's, and the check would mean nothing)."""
    import requests
    import urllib3

    connections = {
        "http": _guarded(urllib3.connection.HTTPConnection, guard),
        "https": _guarded(urllib3.connection.HTTPSConnection, guard),
    }

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            pools = {}
            for scheme, pool in (
                ("http", urllib3.HTTPConnectionPool),
                ("https", urllib3.HTTPSConnectionPool),
            ):
                pools[scheme] = type(
                    f"Guarded{pool.__name__}", (pool,), {"ConnectionCls": connections[scheme]}
                )
            self.poolmanager.pool_classes_by_scheme = pools

    session = requests.Session()
    session.trust_env = False
    session.headers["User-Agent"] = user_agent
    for prefix in ("http://", "https://"):
        session.mount(prefix, Adapter())
    return session


class GuardedHttpClient(HttpClient):
    """The gather stage's HTTP client (limits, redirects one hop at a time, image checks) with an AddressGuard."""

    def __init__(self, policy: FetchPolicy, guard: AddressGuard) -> None:
        super().__init__(policy)
        self.guard = guard

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            session = guarded_session(self.guard, self.policy.user_agent)
            self._local.session = session
        return session


def fetch_url(url: str, client: HttpClient) -> bytes:
    """An image URL's bytes, fetched with the guarded client into a temporary file outside the workspace."""
    with tempfile.TemporaryDirectory(prefix="serve-") as folder:
        path = Path(folder) / "download"
        try:
            client.download(url, path)
            return path.read_bytes()
        except BlockedAddress as error:
            raise RequestError(HTTPStatus.FORBIDDEN, f"{_shown(url)}: {error}") from None
        except FetchError as error:
            raise RequestError(_fetch_status(error), f"{_shown(url)}: {error}") from None
        except Cancelled:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping") from None


def _fetch_status(error: FetchError) -> int:
    if error.failure in (FetchFailure.NOT_HTTP, FetchFailure.BAD_URL):
        return HTTPStatus.BAD_REQUEST
    if error.failure is FetchFailure.TOO_LARGE:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    if error.failure is FetchFailure.NOT_AN_IMAGE:
        return HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    return HTTPStatus.BAD_GATEWAY  # the other server failed: its status, a timeout, a dropped connection


def _shown(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# What a request carries: photos (named), or URLs.


def upload_name(filename: str | None) -> str:
    """The name a client gave its file, if it is a plain file name; path parts are refused, not cleaned up."""
    if not filename:
        return "upload"
    tricks = (
        "/" in filename
        or "\\" in filename
        or filename in (".", "..")
        or any(ord(char) < 32 or ord(char) == 127 for char in filename)
        or (len(filename) > 1 and filename[1] == ":" and filename[0].isalpha())
        or len(filename.encode("utf-8", "surrogatepass")) > 255
    )
    if tricks:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"file name {_shown(filename)!r} has path parts or control characters; "
            "send the photo under a plain file name like photo.jpg",
        )
    return filename


def _header_text(value: str | None) -> str | None:
    """A header parameter as the client wrote it: browsers send UTF-8 file names raw, which the email
    parser keeps as escaped bytes."""
    if value is None:
        return None
    try:
        return value.encode("ascii", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _filename(part) -> str | None:
    """A part's file name exactly as sent: browsers put it in quotes as it is (backslashes too, which the email
    parser would take for escapes), others may use RFC 2231's filename*=."""
    raw = next((value for key, value in part.raw_items() if key.lower() == "content-disposition"), "")
    match = re.search(r'(?:^|;)\s*filename="([^"]*)"', raw) or re.search(r"(?:^|;)\s*filename=([^;\s]+)", raw)
    if match:
        return _header_text(match.group(1))
    return _header_text(part.get_param("filename", header="content-disposition"))


def parse_multipart(content_type: str, body: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
    """multipart/form-data -> ([(file name, bytes)], [urls]): every part with a file name is a photo,
    a field named `url` an image URL."""
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=email_policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or not message.get_boundary():
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "the multipart body has no parts (boundary missing or wrong)"
        )
    files: list[tuple[str, bytes]] = []
    urls: list[str] = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True) or b""
        filename = _filename(part)
        if filename is not None:
            files.append((upload_name(filename), payload))
        elif part.get_param("name", header="content-disposition") == "url":
            urls.extend(
                line.strip() for line in payload.decode("utf-8", "replace").splitlines() if line.strip()
            )
    return files, urls


def parse_json(body: bytes) -> list[str]:
    """{"url": "..."} or {"urls": [...]} -> the URLs."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({error})") from None
    urls = (
        document.get("urls", [document["url"]] if "url" in document else None)
        if isinstance(document, dict)
        else None
    )
    if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'JSON bodies name an image URL: {"url": "https://..."}')
    return urls


def decode_photo(name: str, data: bytes, run: RunFolder, max_bytes: int) -> np.ndarray:
    """The model's input array for one photo, decoded by images.py as in every stage; else a RequestError."""
    if not data:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: empty file (0 bytes); send the photo's bytes")
    if len(data) > max_bytes:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{name}: {len(data) / 1024 / 1024:.1f} MB is over the server's --max-mb {max_bytes / 1024 / 1024:g} MB",
        )
    try:
        return load_array(data, run.image_size, run.resize)  # type: ignore[arg-type]
    except ImageError as error:
        status = (
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE
            if str(error).startswith(NOT_AN_IMAGE)
            else HTTPStatus.UNPROCESSABLE_ENTITY
        )
        raise RequestError(status, f"{name}: {error}") from None
    except Exception as error:  # a file Pillow chokes on in a way of its own
        raise RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY, f"{name}: cannot decode: {type(error).__name__}"
        ) from None


def keep_upload(workspace: Workspace, name: str, data: bytes) -> Path:
    """--keep-uploads: the photo under WORKSPACE/uploads/, under a new name made from safe characters only."""
    stem = "".join(char if char.isalnum() or char in "._-" else "_" for char in Path(name).name)[-80:]
    folder = workspace.uploads
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-{stem.lstrip('.') or 'upload'}"
    write_atomic(path, data)
    return path


# The model: loaded once per run, fed in batches.


@dataclass
class Job:
    names: list[str]
    arrays: list[np.ndarray]
    views: list[np.ndarray] | None = None
    """The same photos at HEATMAP_SIZE, to draw their heatmaps on; None: no heatmaps asked for."""
    future: Future = field(default_factory=Future)
    """-> (predictions, heatmaps as PNG data URLs or None)."""


class Batcher:
    """One run's model in one thread: the jobs waiting when it is free go through the model together."""

    def __init__(self, run: RunFolder, top_k: int, threshold: float, window: float = BATCH_WINDOW) -> None:
        self.run = run
        self.predictor = Predictor(run)
        self.top_k = top_k
        self.threshold = threshold
        self.window = window
        self.batches = 0
        """Model calls so far (each with every photo waiting then), for /health and the load test."""
        self.photos = 0
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._gradcam = None
        self._thread = threading.Thread(target=self._loop, name=f"model-{run.name}", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Load the model and run it once (a backbone's fast engine starts here), so the first photo is quick."""
        size = self.run.image_size
        self.submit(["warm-up"], [np.zeros((size, size, 3), np.uint8)]).result()
        self.batches = self.photos = 0

    def submit(
        self, names: list[str], arrays: list[np.ndarray], views: list[np.ndarray] | None = None
    ) -> Future:
        job = Job(names, arrays, views)
        with self._lock:
            if self._closed:
                raise RuntimeError("batcher closed")
            self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Stop after the jobs already submitted."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs = [job]
            size = len(job.arrays)
            deadline = time.monotonic() + self.window
            while size < MAX_BATCH:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
                size += len(more.arrays)
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        try:
            names = [name for job in jobs for name in job.names]
            images = np.stack([array for job in jobs for array in job.arrays])
            predictions = self.predictor.predictions(names, images, self.top_k, self.threshold)
            self.batches += 1
            self.photos += len(names)
            start = 0
            for job in jobs:
                count = len(job.arrays)
                maps = self._heatmaps(job.arrays, job.views) if job.views is not None else None
                job.future.set_result((predictions[start : start + count], maps))
                start += count
        except BaseException as error:  # every waiting request hears of it; the thread goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)

    def _heatmaps(self, arrays: list[np.ndarray], views: list[np.ndarray]) -> list[str] | None:
        """Grad-CAM of each photo's top class (explain.py), drawn over the larger view of it; None for a model
        without convolutional feature maps (mlp), which Grad-CAM cannot explain."""
        from . import explain

        if self._gradcam is None:
            try:
                self._gradcam = explain.GradCam(self.predictor.model)
            except UserError:
                self._gradcam = False
        if self._gradcam is False:
            return None
        maps = self._gradcam.heatmaps(np.stack(arrays))
        return [
            png_data_url(explain.overlay(view, heatmap)) for view, heatmap in zip(views, maps, strict=True)
        ]


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Models:
    """The runs being served, by name: the first one loaded at start, others on first request (a few kept)."""

    def __init__(self, first: RunFolder, top_k: int, threshold: float) -> None:
        self.first = first
        self.workspace = first.workspace
        self.top_k = top_k
        self.threshold = threshold
        self._loaded: OrderedDict[str, Batcher] = OrderedDict()
        self._lock = threading.Lock()
        self.get(None).warm_up()

    def finished_runs(self) -> list[str]:
        return [run.name for run in RunFolder.finished(self.workspace)]

    def get(self, name: str | None) -> Batcher:
        """The batcher of a finished run of this workspace; a name from a client never reaches the file system
        as a path: it must be one of the finished runs' folder names."""
        if name in (None, "", self.first.name):
            run = self.first
        elif name in self.finished_runs():
            run = RunFolder.find(self.workspace, name)
        else:
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"no finished run named {_shown(name)!r}; GET /health lists the runs"
            )
        with self._lock:
            batcher = self._loaded.pop(run.name, None) or Batcher(run, self.top_k, self.threshold)
            self._loaded[run.name] = batcher
            while len(self._loaded) > MAX_LOADED_RUNS:
                _, oldest = self._loaded.popitem(last=False)
                oldest.close()
        return batcher

    def close(self) -> None:
        with self._lock:
            for batcher in self._loaded.values():
                batcher.close()
            self._loaded.clear()


# HTTP.


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, options: ServeOptions, models: Models, client: HttpClient) -> None:
        self.options = options
        self.models = models
        self.client = client
        self.requests_served = 0
        self.photos_served = 0
        self.refused = 0
        self.count_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().__init__((options.host, options.port), Handler)
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}/"


STATIC = {
    "/": ("serve.html", "text/html; charset=utf-8"),
    "/serve.js": ("serve.js", "text/javascript; charset=utf-8"),
}
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT
    server_version = "image-classifier-serve"

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def log_message(self, format: str, *args) -> None:
        print(f"{self.address_string()} {format % args}", file=sys.stderr)

    def _answer(self, action) -> None:
        try:
            self._check_host()
            action(urlsplit(self.path))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; there is no one to answer
        except RequestError as error:
            with self.server.count_lock:
                self.server.refused += 1
            self.close_connection = True  # the body may be unread: this connection's bytes are not a request
            headers = {"WWW-Authenticate": "Bearer"} if error.status == HTTPStatus.UNAUTHORIZED else {}
            self._send_json(error.status, {"error": error.reason}, headers)
        except UserError as error:  # the run itself cannot be used (say, an inconsistent run folder)
            self.close_connection = True
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})
        except Exception as error:
            self.close_connection = True
            self.log_error("internal error: %s: %s", type(error).__name__, error)
            self._send_json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"internal error: {type(error).__name__}: {error}"},
            )

    def _check_host(self) -> None:
        """On loopback, only a Host of this machine is served (a web page using DNS rebinding to reach the
        server sends its own host name); a POST from another site's page is refused by its Origin."""
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.server.loopback and name not in LOOPBACK_NAMES:
            raise RequestError(
                HTTPStatus.FORBIDDEN, f"Host {_shown(host)!r} is not this server; open {self.server.url}"
            )
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin and urlsplit(origin).netloc != host:
            raise RequestError(HTTPStatus.FORBIDDEN, f"cross-site request from {_shown(origin)} refused")

    def _check_token(self) -> None:
        token = self.server.options.token
        if not token:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode()):
            raise RequestError(
                HTTPStatus.UNAUTHORIZED, "this server needs a token: send Authorization: Bearer TOKEN"
            )

    def _get(self, url) -> None:
        if url.path in STATIC:
            name, content_type = STATIC[url.path]
            page = resources.files("image_classifier").joinpath("static", name).read_bytes()
            self._send(HTTPStatus.OK, page, content_type, {"Content-Security-Policy": PAGE_POLICY})
        elif url.path == "/health":
            self._check_token()
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            self._send_json(HTTPStatus.OK, health(self.server, query.get("run")))
        elif url.path == "/predict":
            raise RequestError(
                HTTPStatus.METHOD_NOT_ALLOWED, "POST photos to /predict (GET /health says what is served)"
            )
        else:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no page {_shown(url.path)!r}; try / or /health")

    def _post(self, url) -> None:
        if url.path != "/predict":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {_shown(url.path)!r}; POST to /predict")
        self._check_token()
        with self.server.slots:
            self._predict({key: values[-1] for key, values in parse_qs(url.query).items()})

    def _predict(self, query: dict[str, str]) -> None:
        """Read the photos, keep them if asked, and answer with the model's records once its batch is done."""
        batcher = self.server.models.get(query.get("run"))
        names, arrays, originals = self._photos(self._body(), batcher.run, query)
        if self.server.options.keep_uploads:
            for name, data in zip(names, originals, strict=True):
                keep_upload(batcher.run.workspace, name, data)
        views = None
        if query.get("heatmap", "0").lower() in ("1", "true", "yes"):
            size = max(HEATMAP_SIZE, batcher.run.image_size)
            views = [load_array(data, size, batcher.run.resize) for data in originals]  # type: ignore[arg-type]
        try:
            future = batcher.submit(names, arrays, views)
        except RuntimeError:  # let go of just now, to make room for another run
            batcher = self.server.models.get(query.get("run"))
            future = batcher.submit(names, arrays, views)
        predictions, maps = future.result()
        self._send_json(HTTPStatus.OK, response_document(predictions, maps, batcher))
        with self.server.count_lock:
            self.server.requests_served += 1
            self.server.photos_served += len(predictions)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header with the body")
        size = int(length)
        if size == 0:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                'empty body: send photos as multipart/form-data or JSON {"url": "https://..."}',
            )
        limit = self.server.options.max_bytes + MULTIPART_OVERHEAD
        if size > limit:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request is {size / 1024 / 1024:.1f} MB, over the server's --max-mb {self.server.options.max_mb:g} MB",
            )
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {READ_TIMEOUT:g} s"
            ) from None
        if len(body) < size:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {size} bytes")
        return body

    def _photos(
        self, body: bytes, run: RunFolder, query: dict
    ) -> tuple[list[str], list[np.ndarray], list[bytes]]:
        """The request's photos, each decoded (URLs fetched first); the first bad one refuses the request."""
        content_type = self.headers.get("Content-Type", "")
        kind = content_type.split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            files, urls = parse_multipart(content_type, body)
        elif kind == "application/json":
            files, urls = [], parse_json(body)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            files, urls = [(upload_name(query.get("name")), body)], []
        else:
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"cannot read a {kind or 'body without a Content-Type'}; send multipart/form-data, "
                "application/json or the image bytes",
            )
        files += [(url, fetch_url(url, self.server.client)) for url in urls]
        if not files:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "no photo in the request: send a file part or a url field"
            )
        max_bytes = self.server.options.max_bytes
        arrays = [decode_photo(name, data, run, max_bytes) for name, data in files]
        return [name for name, _ in files], arrays, [data for _, data in files]

    def _send_json(self, status: int, document: dict, headers: dict | None = None) -> None:
        body = json.dumps(document, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", headers or {})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def response_document(predictions: list[Prediction], maps: list[str] | None, batcher: Batcher) -> dict:
    """predict.py's --json document; with ?heatmap=1 each record also has its Grad-CAM overlay."""
    document = predictions_document(predictions, batcher.run, batcher.threshold)
    if maps is not None:
        for record, heatmap in zip(document["predictions"], maps, strict=True):
            record["heatmap"] = heatmap
    return document


def health(server: Server, name: str | None = None) -> dict:
    """What is served: the run (the first one, or ?run=NAME), its labels, and the runs there are."""
    batcher = server.models.get(name)
    run = batcher.run
    return {
        "status": "ok",
        "run": run.name,
        "run_path": str(run.path),
        "labels": run.labels,
        "image_size": run.image_size,
        "threshold": batcher.threshold,
        "runs": server.models.finished_runs(),
        "max_mb": server.options.max_mb,
        "requests": server.requests_served,
        "photos": server.photos_served,
        "refused": server.refused,
        "batches": batcher.batches,
    }


# Starting and stopping.


def start_server(options: ServeOptions, workspace: Workspace, err=None) -> Server:
    """Everything up to the first request: the run checked and its model warmed up, the port bound."""
    err = err or sys.stderr
    token = options.token if options.token is not None else os.environ.get("SERVE_TOKEN") or None
    options = dataclasses.replace(options, token=token)
    try:
        loopback = ipaddress.ip_address(options.host).is_loopback
    except ValueError:
        raise UserError(f"--host {options.host!r} is not an IP address; give 127.0.0.1 or 0.0.0.0") from None
    guard = AddressGuard.of(options.allow_networks)
    run = RunFolder.find(workspace, options.run)
    if not loopback:
        print(
            f"warning: listening on {options.host}: any machine that can reach this one can use the model"
            + ("" if options.token else "; give --token (or $SERVE_TOKEN) to require a bearer token"),
            file=err,
        )
    print(f"Loading run {run.name} ({len(run.labels)} labels: {', '.join(run.labels)})", file=err)
    models = Models(run, options.top_k, options.threshold)
    if models.get(None).predictor.cannot_judge:
        print(f"note: {models.get(None).predictor.cannot_judge}", file=err)
    policy = FetchPolicy(timeout=15.0, max_time=60.0, retries=1, max_bytes=options.max_bytes)
    try:
        return Server(options, models, GuardedHttpClient(policy, guard))
    except OSError as error:
        models.close()
        raise UserError(
            f"cannot listen on {options.host}:{options.port} ({error.strerror or error}); "
            "choose another --port, or stop what uses it"
        ) from None


def serve(options: ServeOptions, workspace: Workspace, err=None) -> Server:
    """The serve stage: answer until Ctrl-C, then say what was served."""
    err = err or sys.stderr
    server = start_server(options, workspace, err)
    run = server.models.first
    print(
        f"Serving run {run.name} on {server.url}  (API: POST {server.url}predict, GET {server.url}health; Ctrl-C stops)",
        file=err,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.models.close()
        print(
            f"Served {server.photos_served} photo{'s' if server.photos_served != 1 else ''} in "
            f"{server.requests_served} request{'s' if server.requests_served != 1 else ''}; refused {server.refused}",
            file=err,
        )
    return server
