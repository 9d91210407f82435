"""The proof that a weight sync reached every rollout engine, and that the engine uses it.

Two questions, answered separately so a failure says which went wrong:

1. **Did the weights arrive?** Every engine (the in-process engine, each host's engine, each
   rollout server) fingerprints the parameter buffers its jitted forward reads, on device
   (`fingerprint.py`); the trainer fingerprints its own parameters after the same name and
   layout mapping (`weight_map`). Exact, whatever the learning rate: a skipped, partial,
   stale or mis-laid-out sync fails, naming the first parameter and the engine that differ
   (`NotArrivedError`).
2. **Does the engine compute what the trainer computes with them?** Both score a fixed
   pseudo-random token sequence teacher-forced and compare whole next-token distributions
   (`scoring.py`): max |Δ logprob| over the trainer's top-16 tokens at 8 positions, checked
   against a threshold calibrated per dtype from measured noise (`ComputesDifferentlyError`).

Each rollout supplies its engines' side (`sync_evidence(seq)`: one `EngineReport` per
engine); `prove` does the rest, identically for every topology.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any

import numpy as np

from tunix_sglang.engine.weight_map import IncompleteSyncError, flatten_tunix_params
from tunix_sglang.probe import fingerprint, scoring

# Default --sync-check-threshold: max |Δ logprob| over the probe's top-16 tokens. Calibrated
# in bench/probe_calibration.py (bench/README.md, "Sync proof"): float32 engines agree with
# the trainer to <= 2.8e-5 and one optimizer step at lr 2e-4 moves the value by >= 0.016.
# bfloat16 logits carry 8 significant bits, and the two programs round differently at every
# layer: the disagreement grows with the logits (0.35 on the embedded default, whose top
# logits reach 18), so its threshold is relative to the largest probe logit (with a floor).
FLOAT32_THRESHOLD = 1e-3
BFLOAT16_RELATIVE, BFLOAT16_FLOOR = 0.1, 0.25


class SyncCheckError(RuntimeError):
    """The rollout engine does not hold or does not compute the trainer's weights."""


class NotArrivedError(SyncCheckError):
    """The engine's parameter buffers are not the trainer's (fingerprints differ)."""


class ComputesDifferentlyError(SyncCheckError):
    """The weights arrived (fingerprints match) but the engine's outputs differ."""


@dataclasses.dataclass
class EngineReport:
    """One engine's side of the proof, as it reports it itself."""

    where: str  # "engine", "host 1", "process 0", "server http://..."
    version: int
    params: dict[str, tuple[int, tuple[int, ...], str]]  # name -> (fingerprint, shape, dtype)
    logits: np.ndarray | None  # [positions, vocab]: next-token logits after each prefix

    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (tuple(s), d) for n, (_, s, d) in self.params.items()}


@dataclasses.dataclass
class Proof:
    """What a step records about its sync: `sync_check`, the margins, what it cost."""

    check: str  # "proven", or "shared" when the rollout is the trainer's own model
    version: int
    max_logprob_diff: float | None = None
    kl: float | None = None
    threshold: float | None = None
    by_engine: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {"sync_check": self.check, "sync_max_logprob_diff": self.max_logprob_diff,
                "sync_threshold": self.threshold, "sync_kl": self.kl, "proof_sec": self.seconds}


def params_json(params: dict[str, tuple[int, tuple[int, ...], str]]) -> dict[str, Any]:
    """An engine's fingerprints as JSON (a rollout server's commit and probe responses)."""
    return {n: {"fingerprint": f"{fp:016x}", "shape": list(shape), "dtype": dtype}
            for n, (fp, shape, dtype) in params.items()}


def params_from_json(obj: dict[str, Any]) -> dict[str, tuple[int, tuple[int, ...], str]]:
    return {n: (int(v["fingerprint"], 16), tuple(int(d) for d in v["shape"]), str(v["dtype"]))
            for n, v in obj.items()}


def logits_json(rows: np.ndarray) -> dict[str, Any]:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    return {"shape": list(rows.shape), "float32_base64": base64.b64encode(rows).decode()}


def logits_from_json(obj: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(obj["float32_base64"])
    return np.frombuffer(raw, "<f4").reshape([int(d) for d in obj["shape"]])


def engine_json(engine: Any, prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """An engine's side of the proof as JSON (a rollout server's answers): its fingerprints,
    and with `prompts` its next-token logits after each."""
    out = {"params": params_json(engine.fingerprints())}
    if prompts is not None:
        out["logits"] = logits_json(engine.next_token_logits(prompts))
    return out


def threshold_for(dtype: str, trainer_rows: np.ndarray, override: float | None = None
                  ) -> float:
    """--sync-check-threshold when given, else the calibrated default of the engine dtype
    (for 16-bit engines relative to the largest of the trainer's top-k probe logits)."""
    if override is not None:
        return float(override)
    if dtype not in ("bfloat16", "float16"):
        return FLOAT32_THRESHOLD
    top = np.sort(np.asarray(trainer_rows, np.float64), axis=-1)[:, -scoring.TOP_K:]
    return max(BFLOAT16_FLOOR, BFLOAT16_RELATIVE * float(np.abs(top).max()))


def _dtype_of(reports: list[EngineReport]) -> str:
    """The lowest precision among the engines' parameters (it bounds the agreement)."""
    names = {d for r in reports for _, _, d in r.params.values()}
    return next((d for d in ("float16", "bfloat16") if d in names), "float32")


def check_arrival(version: int, expected: dict[str, int], report: EngineReport) -> None:
    """NotArrivedError naming the first parameter (and the engine) that is not the trainer's."""
    if report.version != version:
        raise NotArrivedError(
            f"weight sync v{version} did not arrive at the rollout {report.where}: it reports "
            f"weight version {report.version}")
    got = {n: fp for n, (fp, _, _) in report.params.items()}
    bad = [n for n in sorted(expected) if got.get(n) != expected[n]]
    if bad:
        first = bad[0]
        seen = f"{got[first]:016x}" if first in got else "missing"
        raise NotArrivedError(
            f"weight sync v{version} did not arrive at the rollout {report.where}: engine "
            f"parameter {first} is not the trainer's (fingerprint {seen}, trainer "
            f"{expected[first]:016x}; {len(bad)} of {len(expected)} parameters differ): the "
            "engine holds other weights than the trainer (skipped, partial or stale sync)")


def expected_for(flat: dict[str, Any], report: EngineReport, version: int,
                 cache: dict[Any, dict[str, int]]) -> dict[str, int]:
    """The fingerprints `report`'s engine must show for the trainer's arrays `flat` (Tunix
    names), computed once per engine layout (`cache`)."""
    key = tuple(sorted(report.layout().items()))
    if key not in cache:
        try:
            cache[key] = fingerprint.expected(flat, report.layout())
        except IncompleteSyncError as e:
            raise NotArrivedError(f"weight sync v{version}: the rollout {report.where} has "
                                  f"other parameters than the trainer: {e}") from None
    return cache[key]


def prove(rollout: Any, trainer_model: Any, version: int, threshold: float | None = None
          ) -> Proof:
    """Prove every engine of `rollout` holds and computes `trainer_model` at `version`.

    Raises NotArrivedError or ComputesDifferentlyError (both SyncCheckError); returns the
    margins otherwise. Runs on every process of a multi-process run (the trainer programs
    are collectives there; the rollouts gather their engines' reports to every process).
    """
    t0 = time.perf_counter()
    flat, _ = flatten_tunix_params(trainer_model)
    seq = scoring.probe_sequence(int(flat["embedder.input_embedding"].shape[0]),
                                 rollout.rollout_config.max_prompt_length)
    reports = rollout.sync_evidence(seq)
    cache: dict[Any, dict[str, int]] = {}
    for r in reports:
        check_arrival(version, expected_for(flat, r, version, cache), r)
    rows = scoring.trainer_rows(trainer_model, seq)
    dtype = _dtype_of(reports)
    limit = threshold_for(dtype, rows, threshold)
    source = "--sync-check-threshold" if threshold is not None else f"the {dtype} default"
    by_engine, kls = {}, []
    for r in reports:
        diff, kl = scoring.compare(rows, np.asarray(r.logits, np.float32))
        by_engine[r.where] = diff
        kls.append(kl)
        if not diff <= limit:
            raise ComputesDifferentlyError(
                f"weight sync v{version} arrived at the rollout {r.where} (every parameter's "
                f"fingerprint matches the trainer's) but the engine computes differently: max "
                f"|Δ logprob| over the top-{scoring.TOP_K} tokens at {len(seq.lengths)} probe "
                f"positions {diff:.3g} > {limit:.3g} ({source}), KL {kl:.3g}")
    return Proof("proven", version, max(by_engine.values()), max(kls), limit, by_engine,
                 time.perf_counter() - t0)
