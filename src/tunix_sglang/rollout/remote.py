"""Single controller: Tunix `BaseRollout` over remote sglang-jax rollout servers (HTTP).

`--rollout-engine sglang_jax_remote` for users who cannot colocate the engine with the
trainer. The servers are `tunix-sglang serve` processes (tunix_sglang.server), given as
URLs or launched here (`launch_servers=K`, rollout/launcher.py: subprocesses on 127.0.0.1,
stopped by PID with `close()`, SIGKILL after a grace period); rollout/client.py makes the
HTTP calls to each (routes and headers: tunix_sglang.protocol).

Per step:
* `generate_ids` groups identical consecutive prompts (the trainer repeats each prompt G times),
  spreads whole groups over the servers that hold the current weight version, and gathers
  the samples back in the original order. Each request carries `expected_version`, so a
  server on another version refuses the work instead of returning off-policy samples.
  A server that dies, times out or refuses has its unfinished groups re-dispatched to the
  others; every group is accepted exactly once. With no usable server left:
  `AllServersDownError` (a UserError: one line).
* `update_params` packs the weights once (weights_wire), pushes them to every server in
  parallel and waits for each to acknowledge the new version (`last_push`: seconds, bytes).
  A server that missed a push (down, restarted) is brought to the current version by the
  next `generate` before it gets any work.
* Servers answer a commit with their own fingerprints of the weights (a catch-up push is checked
  before the server gets work); `sync_evidence` is their side of the proof (`POST /probe`).

Every bounded wait has a timeout: connect 5 s, requests `request_timeout`, a whole rollout
`rollout_timeout`, launches `ready_timeout`.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tunix.rl.rollout import base_rollout

from tunix_sglang import probe
from tunix_sglang import protocol as api
from tunix_sglang.engine import EngineSettings
from tunix_sglang.errors import UserError
from tunix_sglang.probe.scoring import ProbeSequence
from tunix_sglang.rollout.base import Rollout, Samples, Sampling, derive_settings
from tunix_sglang.rollout.client import ServerClient, ServerFailure
from tunix_sglang.rollout.launcher import await_restarts, launch_servers
from tunix_sglang.server_guard import check_token
from tunix_sglang.weights_wire import DEFAULT_CHUNK_BYTES, Payload, flat_numpy_params, pack

logger = logging.getLogger(__name__)


class AllServersDownError(UserError):
    """No rollout server can take work; the run should checkpoint and stop."""


@dataclasses.dataclass
class PushReport:
    """The last push: its version, seconds and bytes (each server gets all of them), the
    servers that acknowledged it and why the others did not."""

    version: int
    seconds: float
    bytes: int
    servers: list[str]
    failed: dict[str, str]


# -- The controller -----------------------------------------------------------------------


def group_prompts(prompts: Sequence[Any]) -> list[tuple[int, int]]:
    """(start, end) of runs of identical consecutive prompts: all G samples of one prompt."""
    groups, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            groups.append((start, i))
            start = i
    return groups


def balance(groups: Sequence[tuple[int, int]], pending: Sequence[int],
            n_servers: int) -> list[list[int]]:
    """Pending group ids per server, largest first to the least loaded (sample counts)."""
    load = [0] * n_servers
    out: list[list[int]] = [[] for _ in range(n_servers)]
    for g in sorted(pending, key=lambda g: groups[g][1] - groups[g][0], reverse=True):
        j = min(range(n_servers), key=lambda j: load[j])
        out[j].append(g)
        load[j] += groups[g][1] - groups[g][0]
    return [sorted(x) for x in out]


def _urls(servers: Any) -> list[str]:
    if servers is None:
        return []
    if isinstance(servers, str):
        servers = servers.split(",")
    out = []
    for s in servers:
        s = str(s).strip().rstrip("/")
        if not s:
            continue
        if "://" not in s:
            s = "http://" + s
        u = urllib.parse.urlsplit(s)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise UserError(f"--rollout-servers {s!r}: use http://HOST:PORT")
        out.append(s)
    return out


class RemoteRollout(Rollout):
    """Rollouts on remote sglang-jax servers with versioned weight pushes."""

    def __init__(self, rollout_actor: Any, tokenizer: Any, mesh: Any,
                 rollout_config: base_rollout.RolloutConfig, *, model_dir: Any = None,
                 train_config: Any = None, servers: Any = None, launch_servers: int = 0,
                 token: str | None = None, request_timeout: float = 600.0,
                 rollout_timeout: float = 1800.0, ready_timeout: float = 300.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, relaunch_dead: bool = True,
                 keep_model_copy: bool = True):
        token = token or os.environ.get(api.TOKEN_ENV) or None
        if token is not None:
            check_token(token, "--server-token")
        urls = _urls(servers)
        if not urls and launch_servers <= 0:
            raise UserError(
                "--rollout-engine sglang_jax_remote needs --rollout-servers URL,... or "
                "--launch-servers K"
            )
        super().__init__(rollout_actor, tokenizer, mesh, rollout_config,
                         keep_model_copy=keep_model_copy)
        self.token = token
        self.request_timeout = float(request_timeout)
        self.rollout_timeout = float(rollout_timeout)
        self.ready_timeout = float(ready_timeout)
        self.chunk_bytes = int(chunk_bytes)
        self.relaunch_dead = relaunch_dead
        self.version = 0
        self.last_servers: list[str] = []
        self.last_push: PushReport | None = None
        self.last_rollout_stats: dict[str, Any] = {}
        self._expected: dict = {}  # fingerprints of _payload per server layout (catch-up)
        self._payload: Payload | None = None
        self._notes: list[str] = []
        self.server_dtype: str | None = None  # pushes are cast to it (servers never cast)
        self._closed = False
        self._after_dispatch: Callable[[int, dict[str, list[int]]], None] | None = None  # tests
        self.servers: list[ServerClient] = [
            ServerClient(u, self.token, self.request_timeout) for u in urls
        ]
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, 2 * (len(urls) + launch_servers)), thread_name_prefix="remote"
        )
        atexit.register(self.close)
        try:
            if launch_servers > 0:
                self._launch(launch_servers, derive_settings(
                    rollout_actor, None, rollout_config, model_dir, train_config))
            self._connect()
            if rollout_actor is not None:
                # at the servers' own version: the trainer's first sync sets the real one
                self._sync(rollout_actor, self.version)
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------------
    def _launch(self, k: int, settings: EngineSettings) -> None:
        """K local servers, each able to take a whole step alone (what it must do if the
        others die)."""
        procs = launch_servers(
            k, token=self.token, ready_timeout=self.ready_timeout, model_dir=settings.model_path,
            max_prompt_length=settings.max_prompt_len, max_new_tokens=settings.max_new_tokens,
            max_batch=settings.batch_size, mem_fraction_static=settings.mem_fraction_static,
            dtype=settings.dtype, seed=settings.seed,
        )
        for p in procs:
            self.servers.append(ServerClient(p.url, self.token, self.request_timeout, p))

    def _connect(self) -> None:
        rc = self.rollout_config
        vocab = None
        for s in self.servers:
            try:
                s.info = s.call("GET", api.INFO, timeout=10.0)
            except ServerFailure as e:
                s.last_error = str(e)
                self._note(f"rollout server {s.url} unreachable at start: {e}")
                continue
            problems = []
            if s.info["max_prompt_len"] < rc.max_prompt_length:
                problems.append(f"--max-prompt-length {s.info['max_prompt_len']} < "
                                f"{rc.max_prompt_length}")
            if s.info["max_new_tokens"] < rc.max_tokens_to_generate:
                problems.append(f"--max-new-tokens {s.info['max_new_tokens']} < "
                                f"{rc.max_tokens_to_generate}")
            if problems:
                raise UserError(f"rollout server {s.url}: {'; '.join(problems)}; restart it "
                                "with larger limits")
            s.version = int(s.info["weight_version"])
            s.up = True
            vocab = vocab or int(s.info["vocab_size"])
            self.server_dtype = self.server_dtype or str(s.info["dtype"])
        if not any(s.up for s in self.servers):
            raise AllServersDownError(self._down_message())
        self.check_vocab(vocab, "the servers'")
        # A restarted controller continues after the newest version a server holds
        # (servers refuse pushes older than what they have).
        self.version = max(s.version or 0 for s in self.servers)

    def _down_message(self) -> str:
        self._notes.clear()  # the error's one line says it all
        detail = "; ".join(f"{s.url}: {s.last_error or 'down'}" for s in self.servers)
        return (f"all {len(self.servers)} rollout servers are down ({detail[:600]}); restart "
                "them (tunix-sglang serve ...) and rerun with --resume")

    # -- server health and catch-up -------------------------------------------------------
    def _note(self, msg: str) -> None:
        """A server event, logged once the call that saw it succeeds: if every server is
        down, AllServersDownError's one line reports them instead."""
        self._notes.append(msg)

    def _flush_notes(self) -> None:
        while self._notes:
            logger.warning(self._notes.pop(0))

    def _mark_down(self, s: ServerClient, why: str) -> None:
        if s.up:
            self._note(f"rollout server {s.url} taken out of rotation: {why}")
        s.up = False
        s.last_error = why
        self._relaunch_if_dead(s)

    def _relaunch_if_dead(self, s: ServerClient) -> None:
        """A launched server whose process is gone (killed, or exited on engine death)."""
        p = s.launched
        if p is None or not self.relaunch_dead or self._closed or s.relaunches >= 3:
            return
        # Same port, so the URL stays; it rejoins (after catch-up) once READY.
        if p.relaunch(urllib.parse.urlsplit(s.url).port, "engine died" in s.last_error):
            s.relaunches += 1
            self._note(f"relaunched rollout server {s.url} (attempt {s.relaunches})")

    def _refresh(self) -> None:
        """Bring back servers that answer again, pushing the current weights first; with none
        live, wait for the launched ones restarting after an engine death first."""
        def check(s: ServerClient) -> None:
            try:
                h = s.health()
                s.version = int(h["weight_version"])
                if s.version != self.version:
                    if self._payload is None:
                        raise ServerFailure(f"holds version {s.version}, controller has "
                                            f"{self.version} and no weights to push")
                    s.push(self._payload, self.version)
                    self._check_catch_up(s)
                s.up = True
                logger.info("rollout server %s back at version %d", s.url, self.version)
            except ServerFailure as e:
                s.last_error = str(e)
                self._relaunch_if_dead(s)

        down = [s for s in self.servers if not s.up]
        for f in [self._pool.submit(check, s) for s in down]:
            f.result()
        if down and not self.live_servers() and self._restarted():
            self._refresh()

    def _restarted(self) -> bool:
        return await_restarts([s.launched for s in self.servers], self.ready_timeout)

    def live_servers(self) -> list[ServerClient]:
        return [s for s in self.servers if s.up and s.version == self.version]

    # -- Rollout ----------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self.version

    def generate_ids(self, ids: list[list[int]], sampling: Sampling, seed: int | None
                     ) -> Samples:
        """Fault-tolerant dispatch: whole groups per server, re-dispatch of the groups of a
        server that fails, each group accepted once, original order (`last_servers`: the
        server of each sample)."""
        t_start = time.perf_counter()
        deadline = time.monotonic() + self.rollout_timeout
        groups = group_prompts([tuple(p) for p in ids])
        results: dict[int, tuple[list[dict], int, str]] = {}
        rnd, redispatched = 0, 0
        overhead, server_seconds = 0.0, 0.0
        while len(results) < len(groups):
            if time.monotonic() > deadline:
                raise AllServersDownError(
                    f"rollout did not finish in {self.rollout_timeout:g}s; "
                    f"{len(groups) - len(results)} prompt groups left. " + self._down_message()
                )
            t0 = time.perf_counter()
            self._refresh()
            live = self.live_servers()
            if not live:
                raise AllServersDownError(self._down_message())
            pending = [g for g in range(len(groups)) if g not in results]
            plan = balance(groups, pending, len(live))
            futures = {}
            for j, (s, gids) in enumerate(zip(live, plan, strict=True)):
                if not gids:
                    continue
                prompts = [list(ids[i]) for g in gids for i in range(*groups[g])]
                req = dict(dataclasses.asdict(sampling), prompts=prompts,
                           expected_version=self.version,
                           seed=None if seed is None else (seed + 7919 * rnd + 104729 * j)
                           % 2**31)
                futures[self._pool.submit(s.call, "POST", api.GENERATE, req)] = (s, gids)
            overhead += time.perf_counter() - t0
            if self._after_dispatch is not None:
                self._after_dispatch(rnd, {s.url: gids for s, gids in futures.values()})
            for fut in concurrent.futures.as_completed(futures, timeout=self.request_timeout
                                                       + 30):
                s, gids = futures[fut]
                try:
                    out = fut.result()
                    want = sum(groups[g][1] - groups[g][0] for g in gids)
                    got = out.get("samples", [])
                    if len(got) != want or out.get("weight_version") != self.version:
                        raise ServerFailure(f"{s.url}: returned {len(got)} samples at version "
                                            f"{out.get('weight_version')}, wanted {want} at "
                                            f"{self.version}")
                except ServerFailure as e:
                    self._mark_down(s, str(e))
                    redispatched += len(gids)
                    continue
                t1 = time.perf_counter()
                server_seconds = max(server_seconds, float(out.get("seconds", 0.0)))
                k = 0
                for g in gids:
                    n = groups[g][1] - groups[g][0]
                    if g not in results:  # exactly once
                        results[g] = (got[k:k + n], int(out["weight_version"]), s.url)
                    k += n
                overhead += time.perf_counter() - t1
            rnd += 1
        samples = Samples(list(ids), [], [], [], redispatched)
        self.last_servers = []
        for g in range(len(groups)):
            got, v, url = results[g]
            samples.tokens += [np.asarray(x["tokens"], np.int32) for x in got]
            samples.logprobs += [np.asarray(x["logprobs"], np.float32) for x in got]
            samples.versions += [v] * len(got)
            self.last_servers += [url] * len(got)
        self._flush_notes()
        self.last_rollout_stats = {
            "seconds": time.perf_counter() - t_start, "rounds": rnd,
            "redispatched_groups": redispatched, "controller_overhead_seconds": overhead,
            "slowest_server_seconds": server_seconds,
        }
        return samples

    def _sync(self, params: Any, version: int | None) -> None:
        """Push the weights to every server in parallel; wait for each to hold `version`
        (None: the next one)."""
        t0 = time.perf_counter()
        payload = pack(flat_numpy_params(params, self.server_dtype), self.chunk_bytes)
        version = self.version + 1 if version is None else int(version)
        targets = [s for s in self.servers if s.up]
        if not targets:
            self._refresh_for_push()
            if not any(s.up for s in self.servers) and self._restarted():
                self._refresh_for_push()
            targets = [s for s in self.servers if s.up]
        if not targets:
            raise AllServersDownError(self._down_message())
        futs = {self._pool.submit(s.push, payload, version): s for s in targets}
        done, failed = [], {}
        for f in concurrent.futures.as_completed(futs, timeout=self.request_timeout + 30):
            s = futs[f]
            try:
                f.result()
                done.append(s.url)
            except ServerFailure as e:
                failed[s.url] = str(e)
                self._mark_down(s, str(e))
        if not done:
            raise AllServersDownError(self._down_message())
        self.version = version
        self._payload = payload  # for catching up servers that missed this push
        self._expected = {}
        self.last_push = PushReport(version, time.perf_counter() - t0, payload.total_bytes,
                                    sorted(done), failed)
        self._flush_notes()

    def _refresh_for_push(self) -> None:
        for s in self.servers:
            try:
                s.version = int(s.health()["weight_version"])
                s.up = True
            except ServerFailure as e:
                s.last_error = str(e)

    def _check_catch_up(self, s: ServerClient) -> None:
        """A server caught up outside a step gets work before the next proof: check it now."""
        report = probe.EngineReport(f"server {s.url}", int(s.version), s.params, None)
        probe.check_arrival(self.version, probe.expected_for(
            self._payload.arrays(), report, self.version, self._expected), report)

    def sync_evidence(self, seq: ProbeSequence) -> list[probe.EngineReport]:
        """Every live server's side of the sync proof (its fingerprints and probe logits)."""
        req = {"prompts": seq.prefixes(), "expected_version": self.version}
        self._refresh()
        futs = {self._pool.submit(s.call, "POST", api.PROBE, req): s
                for s in self.live_servers()}
        reports = []
        for f in concurrent.futures.as_completed(futs, timeout=self.request_timeout + 30):
            s = futs[f]
            try:
                out = f.result()
            except ServerFailure as e:
                self._mark_down(s, str(e))
                continue
            reports.append(probe.EngineReport(
                f"server {s.url}", int(out["weight_version"]),
                probe.params_from_json(out["params"]), probe.logits_from_json(out["logits"])))
        if not reports:
            raise AllServersDownError(self._down_message())
        self._flush_notes()
        return sorted(reports, key=lambda r: r.where)

    def close(self) -> None:
        """Stop launched servers (by PID; SIGKILL after 5 s) and close connections."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for s in self.servers:
            if s.launched is not None:
                s.launched.stop()
            s.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
