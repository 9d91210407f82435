"""The rollout server over real HTTP on 127.0.0.1: real engine, no fakes.

One server subprocess for the module (engine start ~25 s), with a token and small body
limits so the limit paths are cheap to hit.
"""

from __future__ import annotations

import argparse
import os
import zlib

import httpx
import numpy as np
import pytest
from conftest import one_device_mesh, perturbed

os.environ.setdefault("JAX_PLATFORMS", "cpu")


from tunix_sglang.models import inspect_model_dir, load_model  # noqa: E402
from tunix_sglang.rollout.remote import (  # noqa: E402
    LaunchedServer,
    ServerClient,
    ServerFailure,
    server_args,
)
from tunix_sglang.server import check_bind, is_loopback, serve_main  # noqa: E402
from tunix_sglang.tiny_model import ensure_tiny_model  # noqa: E402
from tunix_sglang.weights_wire import pack, parse_manifest, save_tunix_safetensors  # noqa: E402

TOKEN = "s3cret-test-token"
MAX_PROMPT, MAX_NEW = 32, 8




def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    import jax.numpy as jnp

    seq = list(prompt)
    for _ in range(n):
        t = len(seq)
        logits, _ = model(jnp.asarray([seq]), jnp.arange(t)[None], None,
                          jnp.tril(jnp.ones((t, t), bool))[None])
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def model_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def trainer(model_dir):
    return load_model(inspect_model_dir(model_dir), one_device_mesh())


@pytest.fixture(scope="module")
def server(model_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               TUNIX_SGLANG_SERVER_TOKEN=TOKEN)
    p = LaunchedServer(server_args(
        model_dir=model_dir, max_prompt_length=MAX_PROMPT, max_new_tokens=MAX_NEW, max_batch=4,
        extra=["--max-upload-bytes", str(4 << 20), "--max-request-bytes", str(256 << 10)],
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


def gen_body(**kw):
    body = {"prompts": [[11, 23, 42, 7], [5, 64, 31]], "max_new_tokens": 4, "temperature": 0.0,
            "ignore_eos": True}
    body.update(kw)
    return body


# -- pure checks ---------------------------------------------------------------------------


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


def test_non_loopback_without_token_refused(capsys, monkeypatch):
    monkeypatch.delenv("TUNIX_SGLANG_SERVER_TOKEN", raising=False)
    from tunix_sglang.errors import UserError

    with pytest.raises(UserError, match="needs a shared token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "tok")  # allowed with a token
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    from tunix_sglang.server import add_serve_parser

    add_serve_parser(sub)
    args = p.parse_args(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert serve_main(args) == 2  # refused before binding or starting anything
    assert "needs a shared token" in capsys.readouterr().err


def test_manifest_validation():
    from tunix_sglang.weights_wire import WireError

    pl = pack({"a": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.int32)}, 16)
    m = parse_manifest(pl.manifest.as_json(), 1 << 20)
    assert m.num_chunks == 5 and m.total_bytes == 68
    assert {k: v.tolist() for k, v in pl.arrays().items()}["b"] == list(range(5))
    bad = pl.manifest.as_json()
    bad["tensors"][1]["offset"] = 40
    with pytest.raises(WireError, match="offset"):
        parse_manifest(bad, 1 << 20)
    with pytest.raises(WireError, match="exceeds"):
        parse_manifest(pl.manifest.as_json(), 10)


# -- served ---------------------------------------------------------------------------------


def test_openapi_schema_served(anon):
    r = anon.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in ("/generate", "/weights/uploads", "/weights/uploads/{upload_id}/commit",
              "/weights/load", "/version", "/health", "/pause", "/resume", "/flush", "/probe"):
        assert p in paths, p


def test_health_and_version_need_no_token(anon):
    assert anon.get("/health").json()["status"] == "ok"
    assert anon.get("/version").json()["weight_version"] >= 0


def test_push_and_control_need_the_token(anon, trainer):
    pl = pack({"x": np.zeros(4, np.float32)})
    for method, path, body in [
        ("POST", "/weights/uploads", {"version": 99, "manifest": pl.manifest.as_json()}),
        ("POST", "/weights/load", {"path": "/nonexistent.safetensors", "version": 99}),
        ("POST", "/pause", None), ("POST", "/resume", None), ("POST", "/flush", None),
        ("POST", "/generate", gen_body()),
        ("POST", "/probe", {"prompts": [[1, 2]]}),
    ]:
        r = anon.request(method, path, json=body)
        assert r.status_code == 401, (path, r.text)
        r = anon.request(method, path, json=body, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401, (path, r.text)


def test_push_parity_and_versions(client, trainer):
    """After a push the server computes exactly the pushed model; before it, it does not."""
    from tunix_sglang.probe.scoring import tunix_token_logprobs
    from tunix_sglang.weights_wire import flat_numpy_params

    prompts = [[11, 23, 42, 7], [5, 64, 31]]
    v0 = client.call("GET", "/version")["weight_version"]
    client.push(pack(flat_numpy_params(trainer), chunk_bytes=64 << 10), v0 + 1)
    other = perturbed(trainer)
    for model, version in ((trainer, v0 + 1), (other, v0 + 2)):
        if model is other:
            out = client.call("POST", "/generate", gen_body(prompts=prompts))
            # Tied tiny model: greedy tokens may coincide; the logprobs must not.
            before = max(float(np.max(np.abs(
                tunix_token_logprobs(other, p, s["tokens"], 0.0) - np.asarray(s["logprobs"]))))
                for p, s in zip(prompts, out["samples"], strict=True))
            assert before > 1e-3
            secs = client.push(pack(flat_numpy_params(other), chunk_bytes=64 << 10), version)
            assert secs > 0
        out = client.call("POST", "/generate", gen_body(prompts=prompts, expected_version=version))
        assert out["weight_version"] == version
        for p, s in zip(prompts, out["samples"], strict=True):
            assert s["tokens"] == greedy_tokens(model, p, 4)
            ref = tunix_token_logprobs(model, p, s["tokens"], 0.0)
            assert np.max(np.abs(ref - np.asarray(s["logprobs"]))) <= 1e-4
    # A stale push is refused; a request for another version is refused.
    with pytest.raises(ServerFailure, match="409"):
        client.push(pack(flat_numpy_params(trainer)), v0)
    with pytest.raises(ServerFailure, match="409"):
        client.call("POST", "/generate", gen_body(expected_version=v0))


def test_probe_route_is_the_servers_side_of_the_sync_proof(client, trainer):
    """The commit response and POST /probe carry the server's own fingerprints of what its
    engine holds (equal to the trainer's, computed without an engine) and its logits."""
    from tunix_sglang import probe
    from tunix_sglang.probe import fingerprint, scoring
    from tunix_sglang.weights_wire import flat_numpy_params

    flat = flat_numpy_params(trainer)
    v = client.call("GET", "/version")["weight_version"] + 1
    client.push(pack(flat, chunk_bytes=64 << 10), v)
    layout = {n: (s, d) for n, (_, s, d) in client.params.items()}
    want = fingerprint.expected(flat, layout)
    assert want == {n: fp for n, (fp, _, _) in client.params.items()}
    seq = scoring.probe_sequence(1024, MAX_PROMPT)
    out = client.call("POST", "/probe", {"prompts": seq.prefixes(), "expected_version": v})
    assert out["weight_version"] == v
    assert probe.params_from_json(out["params"]) == client.params
    logits = probe.logits_from_json(out["logits"])
    assert logits.shape == (len(seq.lengths), 1024)
    assert scoring.compare(scoring.trainer_rows(trainer, seq), logits)[0] <= 1e-4
    for body, code in (({"prompts": seq.prefixes(), "expected_version": v - 1}, "409"),
                       ({"prompts": [[1] * (MAX_PROMPT + 1)]}, "422"),
                       ({"prompts": [[1, 10**6]]}, "422"), ({"prompts": []}, "422")):
        with pytest.raises(ServerFailure, match=code):
            client.call("POST", "/probe", body)


def test_load_from_shared_path(client, trainer, tmp_path):
    from tunix_sglang.weights_wire import flat_numpy_params

    path = save_tunix_safetensors(flat_numpy_params(trainer), tmp_path / "w.safetensors")
    v = client.call("GET", "/version")["weight_version"] + 1
    assert client.call("POST", "/weights/load", {"path": str(path), "version": v})[
        "weight_version"] == v
    out = client.call("POST", "/generate", gen_body(prompts=[[11, 23, 42, 7]]))
    assert out["samples"][0]["tokens"] == greedy_tokens(trainer, [11, 23, 42, 7], 4)
    with pytest.raises(ServerFailure, match="422"):
        client.call("POST", "/weights/load", {"path": str(tmp_path), "version": v + 1})


def test_bad_weights_rejected_and_nothing_changes(client, trainer):
    from tunix_sglang.weights_wire import flat_numpy_params

    flat = flat_numpy_params(trainer)
    v = client.call("GET", "/version")["weight_version"]
    dropped = dict(flat)
    dropped.pop(sorted(dropped)[0])
    with pytest.raises(ServerFailure, match="422.*nothing changed"):
        client.push(pack(dropped), v + 1)
    assert client.call("GET", "/version")["weight_version"] == v


def test_malformed_and_oversized_requests_get_4xx(client, server):
    h = client.headers
    with httpx.Client(base_url=server.url, timeout=30, headers=h) as c:
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
        ]
        for r in cases:
            assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
            assert r.json()["detail"]
        # Oversized: request body over --max-request-bytes, upload over --max-upload-bytes.
        r = c.post("/generate", content=b"x" * (300 << 10),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds" in r.json()["detail"]
        big = pack({"w": np.zeros(2 << 20, np.float32)}).manifest.as_json()
        r = c.post("/weights/uploads", json={"version": 10**6, "manifest": big})
        assert r.status_code == 413, r.text
        # A corrupted chunk is refused by its CRC; a chunk longer than announced too.
        pl = pack({"w": np.ones(1000, np.float32)}, chunk_bytes=1000)
        uid = c.post("/weights/uploads", json={"version": 10**6,
                                               "manifest": pl.manifest.as_json()}).json()[
            "upload_id"]
        bad = bytearray(pl.chunk(0))
        bad[3] ^= 0xFF
        assert zlib.crc32(bad) != pl.manifest.chunk_crc32[0]
        r = c.put(f"/weights/uploads/{uid}/chunks/0", content=bytes(bad))
        assert r.status_code == 422 and "CRC32" in r.json()["detail"]
        r = c.put(f"/weights/uploads/{uid}/chunks/1", content=bytes(2000))
        assert r.status_code == 413
        r = c.put(f"/weights/uploads/{uid}/chunks/9", content=bytes(10))
        assert r.status_code == 422
        r = c.post(f"/weights/uploads/{uid}/commit")
        assert r.status_code == 409 and "incomplete" in r.json()["detail"]
        assert c.delete(f"/weights/uploads/{uid}").status_code == 200
        # ... and the server still serves.
        out = c.post("/generate", json=gen_body()).json()
        assert len(out["samples"]) == 2
    assert server.alive()


def test_pause_resume_flush(client):
    client.call("POST", "/pause")
    with pytest.raises(ServerFailure, match="503.*paused"):
        client.call("POST", "/generate", gen_body())
    client.call("POST", "/resume")
    client.call("POST", "/flush")
    assert len(client.call("POST", "/generate", gen_body())["samples"]) == 2
