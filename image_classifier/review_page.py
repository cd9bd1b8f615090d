"""review.html, the page where a user marks each flagged photo, and the small server that saves the marks.

The page is one self-contained file (thumbnails inlined), so it works opened from disk: its Save button
then downloads decisions.csv for `clean.py --decisions FILE`. Served by `clean.py --serve` (127.0.0.1
only), the same button sends the file to the server, which records it at once.

The server accepts a POST only with Content-Type text/csv and a Host of 127.0.0.1 or localhost: a page of
another site cannot send that without the browser asking first (CORS), and a DNS name rebound to this
machine does not pass the Host check.
"""

from __future__ import annotations

import base64
import html
import io
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import UserError
from .images import ImageError, load_array

THUMBNAIL = 128
TITLES = {
    "label": "Likely wrong labels",
    "off-topic": "Off-topic: fits no category",
    "duplicate": "Duplicates",
}


def thumbnail(path: Path) -> str:
    """A data: URL of the photo letterboxed into a small square, or '' when it cannot be read."""
    from PIL import Image

    try:
        array = load_array(path, THUMBNAIL, "pad")
    except (ImageError, OSError):
        return ""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _card(row: dict, images_dir: Path, categories: list[str]) -> str:
    e = html.escape
    options = "".join(
        f'<option value="{e(c)}"{" selected" if c == row["suggested"] else ""}>{e(c)}</option>'
        for c in categories
    )
    twin = f'<div class="twin">same as {e(row["twin"])}</div>' if row["twin"] else ""
    name = e(row["file"])
    return (
        f'<figure class="photo" data-file="{name}" data-given="{e(row["given"])}">'
        f'<img src="{thumbnail(images_dir / row["file"])}" alt="{name}" width="{THUMBNAIL}" height="{THUMBNAIL}">'
        f'<figcaption><div class="file">{name}</div><div>#{row["rank"]} · {e(row["given"])} → '
        f"<b>{e(row['suggested'])}</b> · score {row['score']}</div>{twin}"
        f'<label><input type="radio" name="{name}" value="keep"> keep</label>'
        f'<label><input type="radio" name="{name}" value="exclude"> exclude</label>'
        f'<label><input type="radio" name="{name}" value="move"> move to</label>'
        f'<select aria-label="category for {name}">{options}</select></figcaption></figure>'
    )


SCRIPT = """
function decisionsCsv() {
  const quote = (text) => /[",\\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  const lines = ["file,decision,category"];
  for (const card of document.querySelectorAll("figure.photo")) {
    const picked = card.querySelector("input:checked");
    if (!picked) continue;
    const category = picked.value === "move" ? card.querySelector("select").value : "";
    lines.push([card.dataset.file, picked.value, category].map(quote).join(","));
  }
  return lines.join("\\n") + "\\n";
}
async function save() {
  const status = document.getElementById("status");
  const body = decisionsCsv();
  if (location.protocol.startsWith("http")) {
    const answer = await fetch("decisions", {method: "POST", headers: {"Content-Type": "text/csv"}, body});
    status.textContent = await answer.text();
    status.className = answer.ok ? "saved" : "failed";
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([body], {type: "text/csv"}));
  link.download = "decisions.csv";
  link.click();
  status.textContent = "Downloaded decisions.csv: run clean.py --decisions decisions.csv with the same options";
}
document.getElementById("save").addEventListener("click", save);
"""

STYLE = """
body{font-family:sans-serif;margin:1em}figure.photo{display:inline-block;width:220px;margin:6px;
vertical-align:top;border:1px solid #ccc;padding:4px}figcaption{font-size:12px}.file{word-break:break-all}
.saved{color:#060}.failed{color:#a00}#bar{position:sticky;top:0;background:#fff;padding:6px 0}
"""


def review_html(rows: list[dict], images_dir: Path, categories: list[str]) -> str:
    """The page: one section per issue, the photos in rank order, a keep / exclude / move choice on each."""
    from tqdm.auto import tqdm

    sections = []
    bar = tqdm(total=len(rows), desc="Thumbnails", unit="photo", disable=not rows)
    for issue, title in TITLES.items():
        mine = [row for row in rows if row["issue"] == issue]
        cards = []
        for row in mine:
            cards.append(_card(row, images_dir, categories))
            bar.update()
        body = "".join(cards) or "<p>None found.</p>"
        sections.append(f'<section id="{issue}"><h2>{title} ({len(mine)})</h2>{body}</section>')
    bar.close()
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Review of {html.escape(str(images_dir))}'
        f"</title><style>{STYLE}</style></head><body><h1>Review of {html.escape(str(images_dir))}</h1>"
        '<div id="bar"><button id="save">Save decisions</button> <span id="status">Mark photos, then save; '
        "unmarked photos stay as they are.</span></div>"
        f"{''.join(sections)}<script>{SCRIPT}</script></body></html>"
    )


def make_server(page: Path, on_decisions: Callable[[str], str], port: int = 0) -> ThreadingHTTPServer:
    """A server on 127.0.0.1 that shows `page` and hands a posted decisions.csv to `on_decisions`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _answer(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _local(self) -> bool:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            return host in ("127.0.0.1", "localhost")

        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            if self.path.split("?")[0] not in ("/", "/review.html") or not self._local():
                self._answer(404, b"not found")
                return
            self._answer(200, page.read_bytes(), "text/html; charset=utf-8")

        def do_POST(self) -> None:  # noqa: N802
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if self.path != "/decisions" or kind != "text/csv" or not self._local():
                self._answer(403, b"only the review page may save decisions")
                return
            text = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
            try:
                self._answer(200, on_decisions(text).encode())
            except UserError as error:
                self._answer(400, str(error).encode())

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve(page: Path, on_decisions: Callable[[str], str], port: int, print_fn=print) -> None:
    """Serve until Ctrl-C; each save is recorded as it comes."""
    server = make_server(page, on_decisions, port)
    host, bound = server.server_address[:2]
    print_fn(f"Review page: http://{host}:{bound}/ (Ctrl-C stops; each Save records the decisions at once)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
