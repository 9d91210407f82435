"""Single-controller benchmark (not a test): weight push, rollout throughput, overhead.

In one run on this machine, all on 127.0.0.1:
1. weight-push bandwidth to one server (a ~70 MB Qwen3-shaped model) vs a raw loopback
   TCP transfer of the same bytes between two processes (sendall -> recv_into);
2. rollout throughput (tokens/s) with 1 and 2 remote servers vs the in-process engine, on
   the embedded tiny model, same prompts and shapes, EOS ignored;
3. the controller's own overhead per rollout (dispatch + bookkeeping) and the HTTP/JSON
   overhead (wall time minus the slowest server's engine time).
Writes bench/results/remote.json and prints a markdown table.

    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_remote.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tunix_sglang.models import inspect_model_dir, load_model, load_tokenizer  # noqa: E402
from tunix_sglang.rollout.base import Sampling  # noqa: E402
from tunix_sglang.rollout.client import ServerClient  # noqa: E402
from tunix_sglang.rollout.launcher import launch_servers  # noqa: E402
from tunix_sglang.rollout.remote import RemoteRollout  # noqa: E402
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402
from tunix_sglang.weights_wire import flat_numpy_params, pack  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "remote.json"
PROMPT_LEN, NEW, PROMPTS, G = 24, 32, 4, 4
REPS = 3


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


_RECEIVER = """
import socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept(); n = int(sys.argv[1]); buf = bytearray(n); mv = memoryview(buf); o = 0
while o < n:
    o += c.recv_into(mv[o:o + (1 << 20)])
c.sendall(b"k")
"""


def raw_loopback_seconds(payload: bytearray) -> float:
    """Same bytes over one loopback TCP connection to another process: the floor."""
    p = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(len(payload))],
                         stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            t0 = time.perf_counter()
            s.sendall(payload)
            s.recv(1)
            return time.perf_counter() - t0
    finally:
        p.wait(30)


def bench_push() -> dict:
    spec = TinyModelSpec(vocab_size=4096, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=64, tie_word_embeddings=False)
    path = ensure_tiny_model(spec, cache_dir=Path(tempfile.gettempdir()) / "tsg-bench-models")
    model = load_model(inspect_model_dir(path), _mesh())
    t0 = time.perf_counter()
    flat = flat_numpy_params(model)
    payload = pack(flat)
    pack_s = time.perf_counter() - t0
    (srv,) = launch_servers(1, model_dir=path, max_prompt_length=16, max_new_tokens=4,
                            max_batch=1)
    try:
        c = ServerClient(srv.url, None, request_timeout=120)
        push, transfer, raw = [], [], []
        for i in range(REPS):
            dt = c.push(payload, i + 1)
            apply_s = c.call("GET", "/info")["last_apply"]["apply_seconds"]
            push.append(dt)
            transfer.append(dt - apply_s)
            raw.append(raw_loopback_seconds(payload.buffer))
        c.close()
    finally:
        srv.stop()
    n = payload.total_bytes
    t_push, t_tr, t_raw = min(push), min(transfer), min(raw)
    return {
        "bytes": n, "pack_seconds": pack_s,
        "push_seconds": push, "transfer_seconds": transfer, "raw_loopback_seconds": raw,
        "push_MBps": n / t_push / 1e6, "transfer_MBps": n / t_tr / 1e6,
        "raw_MBps": n / t_raw / 1e6,
        "push_vs_raw": t_raw / t_push, "transfer_vs_raw": t_raw / t_tr,
    }


def bench_rollout() -> dict:
    from tunix.generate.tokenizer_adapter import TokenizerAdapter
    from tunix.rl.rollout import base_rollout

    from tunix_sglang.engine import EngineSettings, InProcessEngine

    md = inspect_model_dir(ensure_tiny_model())
    actor = load_model(md, _mesh())
    tok = TokenizerAdapter(load_tokenizer(md))
    rc = base_rollout.RolloutConfig(max_tokens_to_generate=NEW, max_prompt_length=PROMPT_LEN,
                                    temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[])
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(10, 1000, PROMPT_LEN))) for _ in range(PROMPTS)]
    ids = [p for p in prompts for _ in range(G)]
    sampling = Sampling(max_new_tokens=NEW, temperature=1.0, ignore_eos=True)
    n_tok = len(ids) * NEW
    out: dict = {"samples_per_rollout": len(ids), "new_tokens": NEW}

    eng = InProcessEngine(EngineSettings(str(md.path), max_prompt_len=PROMPT_LEN,
                                         max_new_tokens=NEW, batch_size=len(ids))).start()
    eng.sync_from_tunix(actor)
    times = []
    for i in range(REPS + 1):
        t0 = time.perf_counter()
        eng.generate(ids, max_new_tokens=NEW, temperature=1.0, seed=i, ignore_eos=True)
        times.append(time.perf_counter() - t0)
    eng.shutdown()
    out["inprocess"] = {"seconds": times[1:], "tok_per_s": n_tok / statistics.median(times[1:])}

    class TrainCfg:
        batch_size, num_generations, sglang_mem_fraction_static, dtype, seed = PROMPTS, G, \
            0.8, "float32", 0

    for k in (1, 2):
        r = RemoteRollout(actor, tok, _mesh(), rc, model_dir=md, train_config=TrainCfg(),
                          launch_servers=k)
        try:
            times, overhead, http = [], [], []
            for i in range(REPS + 1):
                t0 = time.perf_counter()
                r.generate_ids(ids, sampling, seed=i)
                dt = time.perf_counter() - t0
                st = r.last_rollout_stats
                times.append(dt)
                overhead.append(st["controller_overhead_seconds"])
                http.append(dt - st["slowest_server_seconds"])
            t0 = time.perf_counter()
            r.update_params(actor)
            step_push = time.perf_counter() - t0
        finally:
            r.close()
        out[f"remote_{k}"] = {
            "seconds": times[1:], "tok_per_s": n_tok / statistics.median(times[1:]),
            "controller_overhead_seconds": statistics.median(overhead[1:]),
            "http_and_dispatch_seconds": statistics.median(http[1:]),
            "push_seconds_tiny_model": step_push,
        }
    return out


def main() -> int:
    t0 = time.perf_counter()
    res = {"machine": {"cpus": os.cpu_count(), "backend": jax.default_backend()}}
    res["push"] = bench_push()
    res["rollout"] = bench_rollout()
    res["bench_seconds"] = time.perf_counter() - t0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    p, r = res["push"], res["rollout"]
    print("| measure | value |\n|---|---|")
    print(f"| push payload | {p['bytes'] / 1e6:.1f} MB |")
    print(f"| raw loopback TCP | {p['raw_MBps']:.0f} MB/s |")
    print(f"| HTTP push, transfer only | {p['transfer_MBps']:.0f} MB/s "
          f"({100 * p['transfer_vs_raw']:.0f}% of raw) |")
    print(f"| HTTP push incl. engine apply | {p['push_MBps']:.0f} MB/s "
          f"({100 * p['push_vs_raw']:.0f}% of raw) |")
    print(f"| pack (device_get + CRC) | {p['pack_seconds']:.3f} s |")
    for name in ("inprocess", "remote_1", "remote_2"):
        x = r[name]
        extra = ""
        if name != "inprocess":
            extra = (f"; controller {1e3 * x['controller_overhead_seconds']:.1f} ms, "
                     f"HTTP+dispatch {1e3 * x['http_and_dispatch_seconds']:.1f} ms per rollout")
        print(f"| rollout {name} | {x['tok_per_s']:.0f} tok/s{extra} |")
    print(f"\nwrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
