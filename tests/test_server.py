"""The rollout server over real HTTP on 127.0.0.1: real engine, no fakes.

One server subprocess for the module (engine start ~25 s), with a token, small body limits,
a --weights-root and a short upload idle time, so the limit paths are cheap to hit. The
numbered findings of issue 12 (requests that killed the engine, corrupted its weights or
reached it unasked) each have a test here; a second server (no token, a fault injected)
shows an engine death and the loopback-only mode.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import socket
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from conftest import one_device_mesh, perturbed

os.environ.setdefault("JAX_PLATFORMS", "cpu")


from tunix_sglang.models import inspect_model_dir, load_model  # noqa: E402
from tunix_sglang.rollout.client import ServerClient, ServerFailure  # noqa: E402
from tunix_sglang.rollout.launcher import LaunchedServer, server_args  # noqa: E402
from tunix_sglang.server import serve_main  # noqa: E402
from tunix_sglang.server_guard import check_bind, is_loopback  # noqa: E402
from tunix_sglang.tiny_model import ensure_tiny_model  # noqa: E402
from tunix_sglang.weights_wire import (  # noqa: E402
    Receiver,
    UnknownUpload,
    UploadStore,
    WireError,
    flat_numpy_params,
    pack,
    parse_manifest,
    save_tunix_safetensors,
)

TOKEN = "s3cret-test-token"
MAX_PROMPT, MAX_NEW, IDLE_S = 32, 8, 4
PROMPT = [11, 23, 42, 7]
CHUNK = 64 << 10


@functools.cache
def _causal_logits():
    """The model's logits over a [1, T] sequence, causal mask, compiled once per T (padding
    after the live tokens changes no earlier position's logits)."""
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def logits(model, seq):
        t = seq.shape[1]
        return model(seq, jnp.arange(t)[None], None, jnp.tril(jnp.ones((t, t), bool))[None])[0]

    return logits


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    import numpy as np

    seq = list(prompt)
    width = MAX_PROMPT + MAX_NEW  # one shape for every call: one compile, not eager op by op
    for _ in range(n):
        logits = _causal_logits()(model, np.asarray([seq + [0] * (width - len(seq))]))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def model_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def trainer(model_dir):
    return load_model(inspect_model_dir(model_dir), one_device_mesh())


@pytest.fixture(scope="module")
def flat(trainer):
    return flat_numpy_params(trainer)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-root")


@pytest.fixture(scope="module")
def server(model_dir, root):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               TUNIX_SGLANG_SERVER_TOKEN=TOKEN)
    env.pop("TUNIX_SGLANG_INJECT_FAULT", None)
    p = LaunchedServer(server_args(
        model_dir=model_dir, max_prompt_length=MAX_PROMPT, max_new_tokens=MAX_NEW, max_batch=4,
        extra=["--max-upload-bytes", str(4 << 20), "--max-request-bytes", str(256 << 10),
               "--weights-root", str(root), "--upload-idle-seconds", str(IDLE_S)],
    ), env)
    try:
        p.wait_ready(240)
        yield p
    finally:
        p.stop()


@pytest.fixture
def client(server):
    c = ServerClient(server.url, TOKEN, request_timeout=60)
    yield c
    c.close()


@pytest.fixture
def anon(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def raw(server):
    """An authorized client that does not raise on errors (status codes are the point)."""
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def gen_body(**kw):
    body = {"prompts": [PROMPT, [5, 64, 31]], "max_new_tokens": 4, "temperature": 0.0,
            "ignore_eos": True}
    body.update(kw)
    return body


def version(c) -> int:
    return c.get("/version").json()["weight_version"] if isinstance(c, httpx.Client) else \
        c.call("GET", "/version")["weight_version"]


def one_line_error(r: httpx.Response, status: int | tuple[int, ...]) -> str:
    """The response is `status` with a one-line JSON detail (no traceback); returns it."""
    assert r.status_code in ((status,) if isinstance(status, int) else status), \
        (r.request.method, r.request.url.path, r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert len(r.text.splitlines()) == 1
    return detail


def push_raw(c: httpx.Client, payload, v: int, after_chunks=None) -> httpx.Response:
    """Begin, every chunk, optional extra steps, commit; the commit (or failing) response."""
    r = c.post("/weights/uploads", json={"version": v, "manifest": payload.manifest.as_json()})
    if r.status_code >= 400:
        return r
    uid = r.json()["upload_id"]
    for i in range(payload.manifest.num_chunks):
        assert c.put(f"/weights/uploads/{uid}/chunks/{i}",
                     content=bytes(payload.chunk(i))).status_code == 200
    if after_chunks:
        after_chunks(uid)
    return c.post(f"/weights/uploads/{uid}/commit")


def served(c: httpx.Client, prompts) -> list[dict]:
    """The server's greedy samples of `prompts` (4 tokens each)."""
    out = c.post("/generate", json=gen_body(prompts=[list(p) for p in prompts]))
    assert out.status_code == 200, out.text
    return out.json()["samples"]


def logprob_gap(c: httpx.Client, model, prompts=(PROMPT,)) -> float:
    """Max |served logprob - `model`'s| over the greedy tokens the server returns."""
    from tunix_sglang.probe.scoring import tunix_token_logprobs

    return max(float(np.max(np.abs(tunix_token_logprobs(model, list(p), s["tokens"], 0.0)
                                   - np.asarray(s["logprobs"]))))
               for p, s in zip(prompts, served(c, prompts), strict=True))


def assert_serves(c: httpx.Client, model, prompts=(PROMPT,)) -> None:
    """Greedy generation equals `model`'s tokens, with its logprobs."""
    for p, s in zip(prompts, served(c, prompts), strict=True):
        assert s["tokens"] == greedy_tokens(model, list(p), 4)
    assert logprob_gap(c, model, prompts) <= 1e-4


def server_rss_mib(c) -> float:
    pid = c.get("/health").json()["pid"]
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024


# -- pure checks ---------------------------------------------------------------------------


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


def _serve_args(*extra: str):
    from tunix_sglang.server import add_serve_parser

    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["serve", "--port", "0", *extra])


def test_non_loopback_without_token_refused(capsys, monkeypatch):
    monkeypatch.delenv("TUNIX_SGLANG_SERVER_TOKEN", raising=False)
    from tunix_sglang.errors import UserError

    with pytest.raises(UserError, match="needs a shared token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "tok")  # allowed with a token
    assert serve_main(_serve_args("--host", "0.0.0.0")) == 2  # before binding anything
    assert "needs a shared token" in capsys.readouterr().err
    for port in ("70000", "-5"):  # were an OverflowError traceback from socket.bind
        assert serve_main(_serve_args("--port", port)) == 2
        assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["a", " " * 20, "only-15-chars!!", "ünïcödé-tøkën-xyz",
                                   "has spaces in it, twenty+"])
def test_weak_token_refused_at_start(capsys, monkeypatch, token):
    """Finding 9: a token of " " or "a" was accepted; a non-ASCII one could never match."""
    monkeypatch.delenv("TUNIX_SGLANG_SERVER_TOKEN", raising=False)
    assert serve_main(_serve_args("--token", token)) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "at least 16 printable ASCII" in err[0], err


def test_manifest_validation():
    pl = pack({"a": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.int32)}, 16)
    m = parse_manifest(pl.manifest.as_json(), 1 << 20)
    assert m.num_chunks == 5 and m.total_bytes == 68
    assert {k: v.tolist() for k, v in pl.arrays().items()}["b"] == list(range(5))

    def bad(edit, match):
        j = json.loads(json.dumps(pl.manifest.as_json()))
        j.pop("digest")
        edit(j)
        with pytest.raises(WireError, match=match):
            parse_manifest(j, 1 << 20)

    bad(lambda j: j["tensors"][1].update(offset=40), "offset")
    bad(lambda j: j.update(total_bytes=68.0), "total_bytes must be a whole number")
    bad(lambda j: j.update(chunk_bytes=True), "chunk_bytes must be a whole number")
    bad(lambda j: j["tensors"][0].update(shape=[0, 2**70]), "dimension")
    bad(lambda j: j["tensors"][0].update(shape="3,4"), "shape must be a list")
    bad(lambda j: j["tensors"][0].update(dtype="complex64"), "dtype")
    bad(lambda j: j.update(chunk_crc32=[2**32] * 5), "CRC32")
    bad(lambda j: j.update(tensors={}), "non-empty list")
    with pytest.raises(WireError, match="exceeds"):
        parse_manifest(pl.manifest.as_json(), 10)


def test_controller_casts_floats_to_the_servers_dtype():
    import ml_dtypes

    flat = flat_numpy_params({"w": np.ones(3, np.float32), "i": np.arange(3, dtype=np.int32)},
                             "bfloat16")
    assert flat["w"].dtype == ml_dtypes.bfloat16 and flat["i"].dtype == np.int32


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024


def test_receiver_memory_follows_chunks_and_commit_rechecks():
    """Finding 5 (memory claimed at begin) and 2 (commit re-verifies), on the receiver."""
    n = 1 << 28  # 1 GiB of float32
    chunk = 16 << 20
    m = parse_manifest({"tensors": [{"name": "w", "dtype": "float32", "shape": [n],
                                     "offset": 0, "nbytes": 4 * n}],
                        "total_bytes": 4 * n, "chunk_bytes": chunk,
                        "chunk_crc32": [zlib.crc32(bytes(chunk))] * (4 * n // chunk)}, 8 << 30)
    data = bytes(chunk)
    before = _rss_mib()
    up = Receiver(m, 1, "u")
    assert _rss_mib() - before < 16  # nothing claimed for the declared 1 GiB
    for i in range(4):
        up.put_chunk(i, data)
    grown = _rss_mib() - before
    assert 48 <= grown <= 128, grown  # the 64 MiB that arrived
    with pytest.raises(WireError, match="CRC32"):
        up.put_chunk(0, b"\x01" + data[1:])
    assert 0 in up.missing()  # a failed resend un-receives the chunk
    up.put_chunk(0, data)
    up.buffer[5] = 1  # memory changed after the chunk was checked
    up.received = set(range(m.num_chunks))
    with pytest.raises(WireError, match="chunk 0 changed"):
        up.seal()
    held = _rss_mib()
    up.release()
    # The 64 MiB mapping goes back to the OS. Measured as a drop rather than against `before`:
    # the 16 MiB temporaries above may stay in malloc's heap (glibc raises its mmap threshold
    # after a large free), which is not memory the receiver holds.
    assert held - _rss_mib() >= 48


def test_commit_or_abort_of_an_upload_just_gone_idle_answers():
    """take()/abort() held the store's lock while get() swept the idle upload under the same
    lock: a commit in the half second before the server's own sweep deadlocked the store (and
    the engine-watch thread that sweeps it)."""
    m = pack({"w": np.zeros(4, np.float32)}).manifest
    for op in ("take", "abort"):
        store = UploadStore(0.05)
        store.begin(m, 1, "u")
        time.sleep(0.1)
        raised = []

        def call(store=store, op=op, raised=raised):
            try:
                getattr(store, op)("u")
            except UnknownUpload as e:
                raised.append(str(e))

        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"{op} deadlocked"
        assert raised and "idle" in raised[0] and not store.active


# -- served ---------------------------------------------------------------------------------


def test_openapi_schema_served(anon):
    r = anon.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in ("/generate", "/weights/uploads", "/weights/uploads/{upload_id}/commit",
              "/weights/load", "/version", "/health", "/pause", "/resume", "/flush", "/probe"):
        assert p in paths, p


def test_health_and_version_need_no_token(anon, raw):
    v = raw.get("/info").json()["weight_version"]  # what the server says with the token
    assert anon.get("/version").json() == {"weight_version": v}
    health = anon.get("/health").json()
    assert health["status"] == "ok" and health["weight_version"] == v
    assert anon.get("/info").status_code == 401  # those two only


def test_token_checked_before_the_body(anon):
    """Finding 9: without the token, nothing is parsed (malformed JSON gave 422, not 401)."""
    pl = pack({"x": np.zeros(4, np.float32)})
    for method, path, kw in [
        ("POST", "/weights/uploads", {"json": {"version": 99, "manifest":
                                               pl.manifest.as_json()}}),
        ("POST", "/weights/load", {"json": {"path": "/nonexistent.safetensors", "version": 99}}),
        ("POST", "/pause", {}), ("POST", "/resume", {}), ("POST", "/flush", {}),
        ("POST", "/generate", {"json": gen_body()}), ("GET", "/info", {}),
        ("POST", "/probe", {"json": {"prompts": [[1, 2]]}}),
        ("POST", "/generate", {"content": b"{not json", "headers": {"content-type":
                                                                      "application/json"}}),
        ("POST", "/generate", {"content": b"x" * (300 << 10)}),  # over the body limit too
        ("PUT", "/weights/uploads/x/chunks/0", {"content": b"x"}),
    ]:
        r = anon.request(method, path, **kw)
        assert one_line_error(r, 401).startswith("missing or wrong token"), path
        wrong = {**kw, "headers": {**kw.get("headers", {}), "authorization": "Bearer wrong"}}
        one_line_error(anon.request(method, path, **wrong), 401)


def test_push_parity_and_versions(client, trainer, raw):
    """After a push the server computes exactly the pushed model; before it, it does not."""
    prompts = [PROMPT, [5, 64, 31]]
    v0 = version(client)
    client.push(pack(flat_numpy_params(trainer), chunk_bytes=CHUNK), v0 + 1)
    assert_serves(raw, trainer, prompts)
    other = perturbed(trainer)
    # Tied tiny model: greedy tokens may coincide; the logprobs must not.
    assert logprob_gap(raw, other, prompts) > 1e-3
    assert client.push(pack(flat_numpy_params(other), chunk_bytes=CHUNK), v0 + 2) > 0
    assert_serves(raw, other, prompts)
    assert client.call("POST", "/generate", gen_body(expected_version=v0 + 2))[
        "weight_version"] == v0 + 2
    # A stale push is refused; a request for another version is refused.
    with pytest.raises(ServerFailure, match="409"):
        client.push(pack(flat_numpy_params(trainer)), v0)
    with pytest.raises(ServerFailure, match="409"):
        client.call("POST", "/generate", gen_body(expected_version=v0))
    client.push(pack(flat_numpy_params(trainer), chunk_bytes=CHUNK), v0 + 3)


def test_probe_route_is_the_servers_side_of_the_sync_proof(client, trainer, raw):
    """The commit response and POST /probe carry the server's own fingerprints of what its
    engine holds (equal to the trainer's, computed without an engine) and its logits."""
    from tunix_sglang import probe
    from tunix_sglang.probe import fingerprint, scoring

    flat = flat_numpy_params(trainer)
    v = version(client) + 1
    client.push(pack(flat, chunk_bytes=CHUNK), v)
    layout = {n: (s, d) for n, (_, s, d) in client.params.items()}
    assert fingerprint.expected(flat, layout) == {n: fp for n, (fp, _, _) in
                                                  client.params.items()}
    seq = scoring.probe_sequence(1024, MAX_PROMPT)
    out = client.call("POST", "/probe", {"prompts": seq.prefixes(), "expected_version": v})
    assert out["weight_version"] == v
    assert probe.params_from_json(out["params"]) == client.params
    logits = probe.logits_from_json(out["logits"])
    assert logits.shape == (len(seq.lengths), 1024)
    assert scoring.compare(scoring.trainer_rows(trainer, seq), logits)[0] <= 1e-4
    for body, code in (({"prompts": seq.prefixes(), "expected_version": v - 1}, 409),
                       ({"prompts": [[1] * (MAX_PROMPT + 1)]}, 422),
                       ({"prompts": [[1, 10**6]]}, 422), ({"prompts": []}, 422),
                       ({"prompts": [[1.5]]}, 422), ({"prompts": [[1]], "extra": 1}, 422)):
        one_line_error(raw.post("/probe", json=body), code)


def test_versions_strictly_increase_and_fit_int64(raw, flat, trainer):
    """Finding 4: same version with other weights was accepted (outputs changed, the version
    did not); 2**63+5 was accepted and then blocked every later push."""
    v = version(raw) + 1
    good = pack(flat, CHUNK)
    assert push_raw(raw, good, v).status_code == 200
    other = pack(flat_numpy_params(perturbed(trainer, scale=0.3)), CHUNK)
    assert "not newer" in one_line_error(push_raw(raw, other, v), 409)
    assert_serves(raw, trainer)
    again = push_raw(raw, good, v)  # the same weights again (a retried commit)
    assert again.status_code == 200 and again.json()["unchanged"] is True
    for big in (2**63 + 5, 2**63, 2**70):
        one_line_error(push_raw(raw, good, big), 422)
    assert version(raw) == v
    assert push_raw(raw, good, v + 1).json()["weight_version"] == v + 1


def test_engine_limits_refused_before_the_scheduler(raw, trainer):
    """Finding 1: top_k = 2**31 reached the scheduler thread, which died for good."""
    bad = [{"top_k": 2**31, "temperature": 1.0}, {"top_k": 2**40, "temperature": 1.0},
           {"top_k": 1025, "temperature": 1.0}, {"prompts": [[1, 2**31]]},
           {"prompts": [[1, 2**70]]}, {"stop_token_ids": [2**40]},
           {"max_new_tokens": 2**63}, {"seed": 2**31}, {"temperature": 1e5},
           {"expected_version": 2**63}, {"prompts": [[1] * (MAX_PROMPT + 1)]},
           {"prompts": [PROMPT] * 65}]
    for kw in bad:
        one_line_error(raw.post("/generate", json=gen_body(**kw)), (413, 422))
    assert raw.get("/health").json()["status"] == "ok"
    ok = raw.post("/generate", json=gen_body(top_k=1024, temperature=1.0, seed=3))
    assert ok.status_code == 200 and len(ok.json()["samples"]) == 2
    assert_serves(raw, trainer)


def test_nan_and_infinity_in_json_are_a_clean_422(raw, root):
    """Finding 8: NaN/Infinity in request JSON gave 500 or a reset connection."""
    head = {"content-type": "application/json"}
    base = json.dumps(gen_body())[:-1]
    for field in ("temperature", "top_p"):
        for lit in ("NaN", "Infinity", "-Infinity"):
            r = raw.post("/generate", content=f'{base}, "{field}": {lit}}}', headers=head)
            assert "finite" in one_line_error(r, 422)
    for body in ('{"prompts": [[NaN]], "max_new_tokens": 2}',
                 '{"prompts": [[1]], "max_new_tokens": Infinity}',
                 '{"version": NaN, "manifest": {}}'):
        path = "/weights/uploads" if "version" in body else "/generate"
        one_line_error(raw.post(path, content=body, headers=head), 422)
    m = pack({"z": np.zeros(0, np.float32)}).manifest.as_json()
    m["tensors"][0]["shape"] = [0, 2**70]
    m.pop("digest")
    one_line_error(raw.post("/weights/uploads", json={"version": 10**6, "manifest": m}), 422)
    one_line_error(raw.post("/weights/load", json={"path": "/" + "a" * 5000, "version": 10**6}),
                   422)
    one_line_error(raw.post("/weights/load", json={"path": str(root / ("a" * 300)) * 10,
                                                   "version": 10**6}), 422)


def _send_slowly(server, path: str, parts: list[bytes], total: int,
                 pause: float = 0.3) -> tuple[int, bytes]:
    """PUT with Content-Length `total`, the body in separate sends `pause` s apart (a streamed
    client)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest("PUT", path)
        conn.putheader("authorization", f"Bearer {TOKEN}")
        conn.putheader("content-length", str(total))
        conn.endheaders()
        for i, part in enumerate(parts):
            time.sleep(pause if i else 0)
            conn.send(part)
        r = conn.getresponse()
        return r.status, r.read()
    except (BrokenPipeError, ConnectionResetError):
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_failed_chunk_resend_is_not_committed(raw, flat, trainer, server):
    """Finding 2: chunk 0 good, then resent bad (CRC, or too long and streamed): the resend
    got 4xx, yet commit returned 200 and the engine served the corrupted bytes."""
    good = pack(flat, CHUNK)
    n0 = len(good.chunk(0))
    bad = bytearray(good.chunk(0))
    bad[100:200] = b"\xff" * 100
    for resend in ("crc", "long"):
        v = version(raw) + 1
        r = raw.post("/weights/uploads", json={"version": v, "manifest":
                                               good.manifest.as_json()})
        uid = r.json()["upload_id"]
        for i in range(good.manifest.num_chunks):
            raw.put(f"/weights/uploads/{uid}/chunks/{i}", content=bytes(good.chunk(i)))
        if resend == "crc":
            r = raw.put(f"/weights/uploads/{uid}/chunks/0", content=bytes(bad))
            assert "CRC32" in one_line_error(r, 422)
        else:
            status, body = _send_slowly(server, f"/weights/uploads/{uid}/chunks/0",
                                        [b"\x7f" * (n0 - 1000), b"\x7f" * 301000], n0 + 300000)
            assert status == 413 and b"longer than" in body
        r = raw.post(f"/weights/uploads/{uid}/commit")
        assert "not received" in one_line_error(r, 409)
        assert version(raw) == v - 1
        assert_serves(raw, trainer)  # nothing corrupted was applied
        assert raw.put(f"/weights/uploads/{uid}/chunks/0",
                       content=bytes(good.chunk(0))).status_code == 200
        assert raw.post(f"/weights/uploads/{uid}/commit").json()["weight_version"] == v
        assert_serves(raw, trainer)


def test_non_finite_or_huge_weights_refused(raw, flat, trainer, root):
    """Finding 3: an all-NaN or all-Inf push committed (then every /generate was a bare 500);
    x1e30 weights were served silently."""
    v = version(raw)
    for label, f in (("nan", lambda a: np.full_like(a, np.nan)),
                     ("inf", lambda a: np.full_like(a, np.inf)),
                     ("one-nan", None), ("x1e30", lambda a: a * np.float32(1e30))):
        if f is None:
            bad = dict(flat)
            q = bad["layers.1.mlp.up_proj.kernel"].copy()
            q[3, 5] = np.nan
            bad["layers.1.mlp.up_proj.kernel"] = q
        else:
            bad = {k: f(x) for k, x in flat.items()}
        detail = one_line_error(push_raw(raw, pack(bad, CHUNK), v + 1), 422)
        assert "nothing changed" in detail and "NaN, Inf or values beyond" in detail, label
        if label == "nan":  # and through /weights/load
            save_tunix_safetensors(bad, root / "nan.safetensors")
            one_line_error(raw.post("/weights/load", json={"path": "nan.safetensors",
                                                           "version": v + 1}), 422)
    assert version(raw) == v
    assert_serves(raw, trainer)


def test_exact_shapes_and_dtypes(raw, flat, trainer):
    """Finding 6: q_proj sent as (4, 16, 64) was reshaped; int8/bool/float64 were cast."""
    v = version(raw)
    q = "layers.0.attn.q_proj.w"
    variants = [flat[q].reshape(4, 16, 64), flat[q].reshape(64, 64), flat[q].astype(np.int8),
                flat[q].astype(bool), flat[q].astype(np.float64), flat[q].astype(np.float16)]
    for x in variants:
        detail = one_line_error(push_raw(raw, pack({**flat, q: x}, CHUNK), v + 1), 422)
        assert f"{q}: must be float32[64, 4, 16] exactly" in detail
    assert version(raw) == v
    assert_serves(raw, trainer)


def test_upload_memory_is_bounded_and_expires(raw, flat, root, server):
    """Finding 5: a 1 GiB begin pinned 1 GiB of RSS forever; a 1 GiB /weights/load with wrong
    names left RSS 1 GiB higher."""
    v = version(raw)
    n = 1 << 28
    big = {"tensors": [{"name": "w", "dtype": "float32", "shape": [n], "offset": 0,
                        "nbytes": 4 * n}], "total_bytes": 4 * n, "chunk_bytes": 64 << 20,
           "chunk_crc32": [0] * 16}
    before = server_rss_mib(raw)
    one_line_error(raw.post("/weights/uploads", json={"version": v + 1, "manifest": big}),
                   (413, 422))
    # A file declaring 1 GiB of wrong tensors (sparse: costs no disk) is refused unread.
    fat = root / "fat.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    with fat.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(8 + len(header) + 4 * n)
    one_line_error(raw.post("/weights/load", json={"path": "fat.safetensors",
                                                   "version": v + 1}), 422)
    assert server_rss_mib(raw) - before < 64
    # An abandoned upload is dropped after --upload-idle-seconds.
    good = pack(flat, CHUNK)
    uid = raw.post("/weights/uploads", json={"version": v + 1, "manifest":
                                             good.manifest.as_json()}).json()["upload_id"]
    assert raw.put(f"/weights/uploads/{uid}/chunks/0",
                   content=bytes(good.chunk(0))).status_code == 200
    assert raw.get("/health").json()["uploading"] is True
    # A chunk still arriving is not idleness: its parts spread over more than
    # --upload-idle-seconds (the upload was dropped under it: a 500 from a closed buffer).
    c1 = bytes(good.chunk(1))
    parts = [c1[:100], c1[100:200], c1[200:]]  # the last arrives 1 s after the idle limit
    status, body = _send_slowly(server, f"/weights/uploads/{uid}/chunks/1", parts, len(c1),
                                pause=(IDLE_S + 1) / 2)
    assert status == 200 and json.loads(body)["remaining"] == good.manifest.num_chunks - 2
    time.sleep(IDLE_S + 1.5)
    assert raw.get("/health").json()["uploading"] is False
    r = raw.put(f"/weights/uploads/{uid}/chunks/2", content=bytes(good.chunk(2)))
    assert "idle" in one_line_error(r, 404)
    # A chunk still arriving when a new upload replaces its own: one line, 404 (was a 500).
    uid = raw.post("/weights/uploads", json={"version": v + 1, "manifest":
                                             good.manifest.as_json()}).json()["upload_id"]
    c0, got = bytes(good.chunk(0)), []
    t = threading.Thread(target=lambda: got.append(_send_slowly(
        server, f"/weights/uploads/{uid}/chunks/0", [c0[:100], c0[100:]], len(c0), pause=1.0)))
    t.start()
    time.sleep(0.3)
    new = raw.post("/weights/uploads", json={"version": v + 1, "manifest":
                                             good.manifest.as_json()}).json()["upload_id"]
    t.join()
    status, body = got[0]
    assert status == 404 and b"replaced" in body and len(body.splitlines()) == 1, body
    assert raw.delete(f"/weights/uploads/{new}").status_code == 200


def test_load_only_under_root(raw, flat, trainer, root, model_dir, tmp_path):
    """Finding 7: errors echoed header content; symlinks were followed anywhere; directories
    had no size bound; a 5,000-character path was a 500."""
    v = version(raw)

    def load(path, version=v + 1):
        return raw.post("/weights/load", json={"path": str(path), "version": version})

    outside = save_tunix_safetensors(flat, tmp_path / "w.safetensors")
    (root / "link.safetensors").unlink(missing_ok=True)
    (root / "link.safetensors").symlink_to(outside)
    (root / "linkdir").unlink(missing_ok=True)
    (root / "linkdir").symlink_to(model_dir)
    for path in (outside, root / "link.safetensors", root / "linkdir", "../" * 8 + "etc",
                 "/etc/passwd", tmp_path):
        assert "outside --weights-root" in one_line_error(load(path), 422), path
    secret = "PRIVATE-HEADER-TEXT-1234"
    header = json.dumps({secret: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "__metadata__": {"note": secret}}).encode()
    (root / "foreign.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                               + bytes(8))
    (root / "broken.safetensors").write_bytes((60).to_bytes(8, "little") +
                                              f'{{"{secret}": not json}}'.encode().ljust(60))
    for name in ("foreign.safetensors", "broken.safetensors"):
        detail = one_line_error(load(name), 422)
        assert secret not in detail and "PRIVATE" not in detail
    # A file of Tunix-named weights, relative to the root, loads: the server then computes
    # exactly those weights, and no longer the ones it had (the logprobs tell them apart
    # where greedy tokens of the two models coincide).
    other = perturbed(trainer, scale=0.3)
    save_tunix_safetensors(flat_numpy_params(other), root / "w.safetensors")
    assert logprob_gap(raw, other) > 1e-3
    assert load("w.safetensors", v + 1).json()["weight_version"] == v + 1
    assert_serves(raw, other)
    assert logprob_gap(raw, trainer) > 1e-3
    # A model dir under the root loads (config checked first): the model's own weights
    # again; one with extra weights does not.
    fat = shutil.copytree(model_dir, root / "fat-model", dirs_exist_ok=True)
    with (fat / "extra.safetensors").open("wb") as f:
        f.truncate(64 << 20)
    assert "larger than twice" in one_line_error(load("fat-model", v + 2), 422)
    local = root / "model"
    if not local.exists():
        shutil.copytree(model_dir, local)
    assert load("model", v + 2).json()["weight_version"] == v + 2
    assert_serves(raw, trainer)


def test_malformed_and_oversized_requests_get_4xx(raw, flat):
    c = raw
    cases = [
        c.post("/generate", content=b"{not json", headers={"content-type":
                                                            "application/json"}),
        c.post("/generate", json={"prompts": "abc", "max_new_tokens": 2}),
        c.post("/generate", json=gen_body(prompts=[])),
        c.post("/generate", json=gen_body(prompts=[[1] * (MAX_PROMPT + 1)])),
        c.post("/generate", json=gen_body(prompts=[[1, 10**6]])),
        c.post("/generate", json=gen_body(max_new_tokens=MAX_NEW + 1)),
        c.post("/generate", json=gen_body(unknown_field=1)),
        c.post("/generate", json=gen_body(temperature=-1)),
        c.post("/weights/uploads", json={"version": 10**6, "manifest": {"tensors": []}}),
        c.post("/weights/uploads/nope/commit"),
        c.put("/weights/uploads/nope/chunks/0", content=b"x"),
        c.post("/generate", content=b"x" * (300 << 10),
               headers={"content-type": "application/json"}),
    ]
    for r in cases:
        one_line_error(r, tuple(range(400, 500)))
    assert "exceeds" in cases[-1].json()["detail"]
    big = pack({"w": np.zeros(2 << 20, np.float32)}).manifest.as_json()
    one_line_error(c.post("/weights/uploads", json={"version": 10**6, "manifest": big}), 413)
    # Chunks of a real upload: out of range, too long.
    pl = pack(flat, CHUNK)
    uid = c.post("/weights/uploads", json={"version": 10**6,
                                           "manifest": pl.manifest.as_json()}).json()["upload_id"]
    one_line_error(c.put(f"/weights/uploads/{uid}/chunks/1", content=bytes(CHUNK + 1)), 413)
    one_line_error(c.put(f"/weights/uploads/{uid}/chunks/99", content=bytes(10)), 422)
    assert c.delete(f"/weights/uploads/{uid}").status_code == 200
    assert len(c.post("/generate", json=gen_body()).json()["samples"]) == 2


def test_pause_resume_flush(client):
    client.call("POST", "/pause")
    with pytest.raises(ServerFailure, match="503.*paused"):
        client.call("POST", "/generate", gen_body())
    client.call("POST", "/resume")
    client.call("POST", "/flush")
    assert len(client.call("POST", "/generate", gen_body())["samples"]) == 2


# -- fuzz -----------------------------------------------------------------------------------

FUZZ_SEED, FUZZ_REQUESTS = 12, 400
# Values no field of any route takes.
JUNK = [None, True, "x", "", [], {}, [[]], -1, -(2**63), 2**63, 2**70, 1.5, "NaN", [None],
        {"a": 1}, "𝕏" * 40]
# ... except these, which some fields take.
VALID_JUNK = [("top_k", -1), ("temperature", 1.5), ("stop_token_ids", [])]
OPTIONAL = {"top_k", "seed", "stop_token_ids", "expected_version"}
FLOAT_JUNK = ["NaN", "Infinity", "-Infinity", "1e400", "-1", "1e5", '"0.5"', "true", "null",
              "[1]"]


def _fuzz_cases(rng: random.Random, good_manifest: dict):
    """(method, path, json body or raw bytes): each request wrong in one place."""
    gen = gen_body(temperature=1.0, top_p=0.9, top_k=5, seed=1, stop_token_ids=[2],
                   expected_version=None)
    gen.pop("expected_version")
    bad_values = {
        "prompts": [[[1, -1]], [[1, 1024]], [[]], [[1] * (MAX_PROMPT + 1)], [[1.0]], [["1"]],
                    [[True]], [PROMPT] * 65, [[2**64]]],
        "max_new_tokens": [0, MAX_NEW + 1, 2**63, 1.0, "4", True],
        "temperature": [-0.1, 1e5, "1", [1.0]],
        "top_p": [0, -0.5, 1.01, "1"],
        "top_k": [-2, 1025, 2**31, 2**40, 2**64, 1.5, "5"],
        "seed": [-1, 2**31, 2**63, 0.5, "1"],
        "stop_token_ids": [[-1], [1024], [2**40], "2", [1] * 65, [1.5]],
        "ignore_eos": ["yes", 1, None],
        "expected_version": [-1, 2**63, 1.5, "3"],
    }
    m = good_manifest

    def manifest_mutation():
        j = json.loads(json.dumps(m))
        j.pop("digest")
        t = rng.randrange(len(j["tensors"]))
        field, value = rng.choice([
            ("name", "not.a.param"), ("name", 7), ("dtype", "float64"), ("dtype", "int8"),
            ("dtype", "qint4"), ("shape", [64, 64]), ("shape", [-1, 4, 16]),
            ("shape", [2**70]), ("offset", 1), ("offset", -8), ("nbytes", 0),
            ("nbytes", 1.5), ("shape", "64,4,16")])
        j["tensors"][t][field] = value
        return j

    def whole_manifest_mutation():
        j = json.loads(json.dumps(m))
        key, value = rng.choice([("total_bytes", -1), ("total_bytes", 2**63),
                                 ("chunk_bytes", 0), ("chunk_bytes", 2**40),
                                 ("chunk_crc32", [1, 2]), ("chunk_crc32", "x"),
                                 ("tensors", []), ("tensors", "x"), ("digest", "0" * 64),
                                 ("extra", None)])
        j[key] = value
        if key == "extra":
            j["tensors"] = j["tensors"][:-1]
        return j

    kinds = ["gen_field", "gen_junk", "gen_extra", "gen_raw", "begin", "begin_manifest",
             "begin_version", "chunk", "commit", "abort", "load", "route"]
    for _ in range(FUZZ_REQUESTS):
        kind = rng.choice(kinds)
        if kind == "gen_field":
            field = rng.choice(sorted(bad_values))
            yield "POST", "/generate", {**gen, field: rng.choice(bad_values[field])}
        elif kind == "gen_junk":
            field = rng.choice(["prompts", "max_new_tokens", "temperature", "top_p", "top_k",
                                "seed", "stop_token_ids", "ignore_eos", "expected_version"])
            value = rng.choice(JUNK)
            if any(field == f and type(value) is type(x) and value == x for f, x in VALID_JUNK) \
                    or (value is None and field in OPTIONAL):
                value = "x"
            yield "POST", "/generate", {**gen, field: value}
        elif kind == "gen_extra":
            yield "POST", "/generate", {**gen, rng.choice(["n", "model", "__proto__"]): 1}
        elif kind == "gen_raw":
            text = json.dumps(gen)
            choice = rng.randrange(4)
            if choice == 0:
                field = rng.choice(["temperature", "top_p"])
                raw_body = text[:-1] + f', "{field}": {rng.choice(FLOAT_JUNK)}}}'
            elif choice == 1:
                raw_body = text[:rng.randrange(1, len(text) - 1)]
            elif choice == 2:
                raw_body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            else:
                raw_body = rng.choice(["[]", "null", "1", '"x"', "{}", '{"prompts": null}'])
            yield "POST", "/generate", raw_body
        elif kind == "begin":
            yield "POST", "/weights/uploads", {"version": 10**6, "manifest": manifest_mutation()}
        elif kind == "begin_manifest":
            yield "POST", "/weights/uploads", {"version": 10**6,
                                               "manifest": whole_manifest_mutation()}
        elif kind == "begin_version":
            yield "POST", "/weights/uploads", {"version": rng.choice(
                [-1, 2**63, 1.5, "2", None, 0]), "manifest": m}
        elif kind == "chunk":
            yield "PUT", f"/weights/uploads/{rng.choice(['x', 'a' * 300, '0', '%00'])}/chunks/" \
                         f"{rng.choice(['0', '-1', 'x', str(2**70)])}", b"\0" * 8
        elif kind == "commit":
            yield "POST", f"/weights/uploads/{rng.choice(['x', 'z' * 100])}/commit", None
        elif kind == "abort":
            yield "DELETE", f"/weights/uploads/{rng.choice(['x', 'y' * 64])}", None
        elif kind == "load":
            yield "POST", "/weights/load", rng.choice([
                {"path": "/etc/passwd", "version": 10**6},
                {"path": "../../etc", "version": 10**6},
                {"path": "missing.safetensors", "version": 10**6},
                {"path": "x" * 5000, "version": 10**6},
                {"path": "a\0b", "version": 10**6},
                {"path": "w.safetensors", "version": -1},
                {"path": "w.safetensors", "version": 0},
                {"path": "w.safetensors", "version": 2**63},
                {"path": "", "version": 10**6}, {"path": 5, "version": 10**6}])
        else:
            yield rng.choice([("GET", "/nope", None), ("POST", "/health", None),
                              ("PATCH", "/generate", gen), ("GET", "/generate", None),
                              ("PUT", "/weights/load", None)])


def test_fuzz_every_route_and_field(raw, flat):
    """A few hundred wrong requests (fixed seed): each a one-line 4xx; the server unchanged."""
    health = raw.get("/health").json()
    ref = raw.post("/generate", json=gen_body()).json()["samples"]
    seen = set()
    t0 = time.perf_counter()
    for method, path, body in _fuzz_cases(random.Random(FUZZ_SEED),
                                          pack(flat, CHUNK).manifest.as_json()):
        if isinstance(body, (str, bytes)):
            r = raw.request(method, path, content=body,
                            headers={"content-type": "application/json"})
        else:
            r = raw.request(method, path, json=body)
        one_line_error(r, tuple(range(400, 500)))
        seen.add((method, path.split("/")[1] if "/" in path else path, r.status_code))
    seconds = time.perf_counter() - t0
    assert len(seen) >= 10
    print(f"fuzz: {FUZZ_REQUESTS} requests in {seconds:.1f}s")
    after = raw.get("/health").json()
    assert after == health and after["status"] == "ok"
    assert raw.post("/generate", json=gen_body()).json()["samples"] == ref


# -- a server whose engine dies; loopback-only mode -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_death_exits_for_a_restart(model_dir):
    """Finding 1's other half: a dead scheduler thread left a 503 zombie nobody noticed. Also
    no-token mode (finding 9, DNS rebinding) and /weights/load off without --weights-root."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               TUNIX_SGLANG_INJECT_FAULT="server_engine_death@2")
    env.pop("TUNIX_SGLANG_SERVER_TOKEN", None)
    p = LaunchedServer(server_args(model_dir=model_dir, max_prompt_length=MAX_PROMPT,
                                   max_new_tokens=MAX_NEW, max_batch=4), env)
    try:
        url = p.wait_ready(240)
        port = url.rsplit(":", 1)[1]
        with httpx.Client(base_url=url, timeout=60) as c:
            for headers in ({"host": "evil.example"}, {"host": f"evil.example:{port}"},
                            {"host": "127.0.0.1.evil.example"}, {"host": "localhost:80@evil"},
                            {"host": "[::1"},  # unclosed: was a bare 500 (urlsplit raised)
                            {"origin": "http://evil.example"}, {"origin": "null"}):
                r = c.post("/pause", headers=headers)
                one_line_error(r, 403)
            assert c.get("/health").json()["paused"] is False
            assert c.get("/info", headers={"host": f"localhost:{port}"}).status_code == 200
            # Finding 5 at the default --max-upload-bytes (8 GiB): a 1 GiB begin claimed 1 GiB.
            n = 1 << 28
            big = {"tensors": [{"name": "w", "dtype": "float32", "shape": [n], "offset": 0,
                                "nbytes": 4 * n}], "total_bytes": 4 * n,
                   "chunk_bytes": 64 << 20, "chunk_crc32": [0] * 16}
            before = server_rss_mib(c)
            r = c.post("/weights/uploads", json={"version": 1, "manifest": big})
            assert "not parameters of this model" in one_line_error(r, 422)
            assert server_rss_mib(c) - before < 64
            r = c.post("/weights/load", json={"path": "w.safetensors", "version": 1})
            assert "--weights-root" in one_line_error(r, 404)
            assert c.post("/generate", json=gen_body()).status_code == 200
            t0 = time.monotonic()
            r = c.post("/generate", json=gen_body())  # the 2nd: the scheduler thread dies
            detail = one_line_error(r, 503)
            assert "engine died" in detail and "injected fault server_engine_death" in detail
            try:
                h = c.get("/health")
                assert h.status_code == 503 and "engine died" in h.json()["status"]
            except httpx.TransportError:
                pass  # already gone
        assert p.proc.wait(30) == 3
        assert time.monotonic() - t0 < 30
        lines = [x for x in p.tail if x.startswith("error: the rollout engine died")]
        assert len(lines) == 1, list(p.tail)
    finally:
        p.kill()
