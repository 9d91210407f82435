"""HTTP calls to one rollout server (`tunix-sglang serve`); every failure is a ServerFailure.

The controller (rollout/remote.py) keeps one `ServerClient` per server: its state as the
controller last saw it (up, weight version, fingerprints of the last push) and the calls.
"""

from __future__ import annotations

import http.client
import time
import urllib.parse
from typing import Any

import httpx

from tunix_sglang import probe
from tunix_sglang import protocol as api
from tunix_sglang.rollout.launcher import LaunchedServer
from tunix_sglang.weights_wire import Payload


class ServerFailure(Exception):
    """One server failed one call (down, timed out, refused); the controller routes around it."""


class ServerClient:
    """HTTP calls to one rollout server; every failure becomes ServerFailure."""

    def __init__(self, url: str, token: str | None, request_timeout: float,
                 launched: LaunchedServer | None = None):
        self.url = url.rstrip("/")
        self.request_timeout = request_timeout
        self.launched = launched
        self.headers = {api.AUTH_HEADER: api.BEARER + token} if token else {}
        self.http = httpx.Client(
            base_url=self.url, headers=self.headers,
            timeout=httpx.Timeout(request_timeout, connect=5.0, pool=5.0),
        )
        self.up = False
        self.version: int | None = None
        self.info: dict[str, Any] = {}
        self.last_error = ""
        self.relaunches = 0
        self.params: dict[str, Any] = {}  # its fingerprints after the last push (probe)

    def __repr__(self) -> str:
        return f"ServerClient({self.url}, up={self.up}, v={self.version})"

    def call(self, method: str, path: str, json: Any = None, timeout: float | None = None):
        try:
            t = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
            r = self.http.request(method, path, json=json, timeout=t)
        except httpx.HTTPError as e:
            raise ServerFailure(f"{self.url}{path}: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ServerFailure(f"{self.url}{path}: HTTP {r.status_code}: {detail}")
        return r.json()

    def health(self, timeout: float = 3.0) -> dict[str, Any]:
        return self.call("GET", api.HEALTH, timeout=timeout)

    def push(self, payload: Payload, version: int) -> float:
        """Begin, stream every chunk, commit; returns seconds. Raises ServerFailure."""
        t0 = time.perf_counter()
        m = payload.manifest
        began = self.call("POST", api.UPLOADS, {"version": version, "manifest": m.as_json()})
        uid = began["upload_id"]
        u = urllib.parse.urlsplit(self.url)
        # http.client sends a memoryview with one sendall (no copies; httpx re-slices bytes).
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=self.request_timeout)
        try:
            for i in range(m.num_chunks):
                for attempt in range(3):  # a CRC mismatch is resent
                    body = payload.chunk(i)
                    conn.request("PUT", api.UPLOAD_CHUNK.format(upload_id=uid, index=i),
                                 body=body, headers={**self.headers, "content-type":
                                                     "application/octet-stream"})
                    r = conn.getresponse()
                    text = r.read()
                    if r.status < 400:
                        break
                    if r.status != 422 or b"CRC32" not in text or attempt == 2:
                        raise ServerFailure(f"{self.url}: chunk {i}: HTTP {r.status}: "
                                            f"{text[:300].decode(errors='replace')}")
        except (OSError, http.client.HTTPException) as e:
            raise ServerFailure(f"{self.url}: push failed: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        done = self.call("POST", api.UPLOAD_COMMIT.format(upload_id=uid))
        if int(done["weight_version"]) != version:
            raise ServerFailure(f"{self.url}: acknowledged version {done['weight_version']}, "
                                f"pushed {version}")
        self.version = version
        self.params = probe.params_from_json(done.get("params") or {})
        return time.perf_counter() - t0

    def close(self) -> None:
        self.http.close()
