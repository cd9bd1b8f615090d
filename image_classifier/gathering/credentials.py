"""Openverse's registered-application access: an OAuth2 client-credentials token, cached and renewed.

Registered applications get far higher limits than anonymous searches (the API's settings: 100 a minute
and 10,000 a day, against 5 an hour and 100 a day). The id and secret come from the environment only;
the token is kept in the workspace in a file only its owner can read, renewed before it expires (the
API's tokens last 12 hours), and neither ever reaches a log line, the manifest or the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urljoin

from ..errors import UserError
from .download import FetchError, FetchFailure, HttpClient

ID_ENV = "OPENVERSE_CLIENT_ID"
SECRET_ENV = "OPENVERSE_CLIENT_SECRET"
TOKEN_FILE = "openverse-token.json"
RENEW_MARGIN = 300.0
"""Seconds before expiry a token is renewed, so no search is sent with one about to lapse."""


class OpenverseCredentials:
    """Bearer headers for Openverse requests; empty (anonymous) when no credentials are set."""

    def __init__(
        self, client: HttpClient, api_url: str, cache_dir: Path, env: Mapping[str, str] = os.environ
    ) -> None:
        self.client = client
        self.client_id = env.get(ID_ENV, "").strip()
        self._secret = env.get(SECRET_ENV, "").strip()
        if bool(self.client_id) != bool(self._secret):
            raise UserError(
                f"set both {ID_ENV} and {SECRET_ENV} (from registering at "
                "https://api.openverse.org/v1/#tag/auth), or neither to search anonymously"
            )
        self.token_url = urljoin(api_url, "../auth_tokens/token/")
        self.cache = cache_dir / TOKEN_FILE
        self._token: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.client_id)

    def headers(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        if self._token is None:
            self._token = self._cached() or self._fetch()
        return {"Authorization": f"Bearer {self._token}"}

    def renew(self) -> None:
        """Forget the token (the API refused it): the next headers() asks for a new one."""
        self._token = None
        self.cache.unlink(missing_ok=True)

    def _owner(self) -> str:
        return hashlib.sha256(self.client_id.encode()).hexdigest()[:16]

    def _cached(self) -> str | None:
        try:
            data = json.loads(self.cache.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        fresh = float(data.get("expires_at", 0)) - RENEW_MARGIN > self.client.clock.now()
        if data.get("client") == self._owner() and fresh and isinstance(data.get("access_token"), str):
            return data["access_token"]
        return None

    def _fetch(self) -> str:
        form = {"grant_type": "client_credentials", "client_id": self.client_id}
        try:
            answer = self.client.post_form(self.token_url, form | {"client_secret": self._secret})
        except FetchError as error:
            if error.failure is FetchFailure.HTTP_STATUS and error.status in (400, 401, 403):
                raise UserError(
                    f"Openverse refused {ID_ENV} / {SECRET_ENV} (HTTP {error.status}): check both, or "
                    "unset them to search anonymously"
                ) from None
            raise
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise FetchError(FetchFailure.BAD_JSON, "the token answer has no access_token")
        lifetime = float(answer.get("expires_in") or 3600)
        self._store(token, self.client.clock.now() + lifetime)
        return token

    def _store(self, token: str, expires_at: float) -> None:
        """Owner-only from the first byte: the file is created 0600 in a 0700 folder, then renamed."""
        self.cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.cache.parent, 0o700)
        temporary = self.cache.with_name(f".{self.cache.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"client": self._owner(), "access_token": token, "expires_at": expires_at}, handle)
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.cache)
