"""The rollout server's HTTP protocol: what the server (server.py, server_guard.py) and its
clients (rollout/client.py, rollout/launcher.py, the CLI) must agree on, in one place.

Routes are FastAPI path templates; a client fills them with `str.format`.
"""

from __future__ import annotations

# The shared token: an environment variable (never on a command line, where `ps` shows it),
# sent as `Authorization: Bearer TOKEN`.
TOKEN_ENV = "TUNIX_SGLANG_SERVER_TOKEN"
AUTH_HEADER = "authorization"
BEARER = "Bearer "

HEALTH = "/health"
VERSION = "/version"
INFO = "/info"
GENERATE = "/generate"
PROBE = "/probe"
UPLOADS = "/weights/uploads"
UPLOAD = UPLOADS + "/{upload_id}"
UPLOAD_CHUNK = UPLOAD + "/chunks/{index}"
UPLOAD_COMMIT = UPLOAD + "/commit"
WEIGHTS_LOAD = "/weights/load"
PAUSE = "/pause"
RESUME = "/resume"
FLUSH = "/flush"
# Answered without a token (liveness and the schema).
PUBLIC_PATHS = frozenset({HEALTH, VERSION, "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})

# A started server prints `READY http://HOST:PORT ...` once it serves.
READY_PREFIX = "READY "
# A server whose engine died exits with this status: "relaunch me" to whoever launched it.
ENGINE_DIED_EXIT = 3
