"""A run's output directory: the files a run writes, and the one reader of each.

- `metrics.jsonl`: one JSON object per step (`metrics.process{i}.jsonl` on process i > 0 of
  a multi-process run: every process records its own view), `REQUIRED_KEYS` at least;
- `eval.jsonl`: one object per held-out evaluation (step 0 is the model before training);
- `config.json` (the run's TrainConfig), `environment.json` (versions, backend, devices);
- `multihost_rollout.process{i}.jsonl`: per-call statistics of a multi-process rollout.

Rows are appended and flushed one at a time, so a killed run keeps every finished row; a
row cut by a kill is skipped by the readers. On `--resume`, rows of steps that will be
re-run move to `<file>.rerun`, never away; a new run in a used directory moves an old
metrics file aside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from tunix_sglang.errors import UserError

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CONFIG_FILE = "config.json"
ENV_FILE = "environment.json"
REQUIRED_KEYS = (
    "step", "loss", "reward_mean", "reward_std", "completion_len_mean", "rollout_sec",
    "sync_sec", "train_sec", "step_sec", "weight_version", "rollout_weight_version",
    "sync_check", "sync_max_logprob_diff", "proof_sec", "mismatch_kl", "mismatch_max_abs",
)
_PACKAGES = ("jax", "jaxlib", "flax", "google-tunix", "sglang-jax", "optax", "numpy",
             "transformers", "matplotlib", "tunix-sglang")


def metrics_path(out_dir: Path, process: int = 0) -> Path:
    return out_dir / (METRICS_FILE if process == 0 else f"metrics.process{process}.jsonl")


def rollout_stats_path(out_dir: Path, process: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"multihost_rollout.process{process}.jsonl"


def _json_line(row: dict[str, Any]) -> str:
    """One row; NaN and infinities become null (JSON has neither)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in row.items()}
    return json.dumps(clean) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file ([] if it is missing); a line cut by a kill is
    skipped, not fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_after(path: Path, step: int) -> None:
    """On resume: rows of steps after `step` (and rows cut by a kill) will be re-run; they
    move to `<path>.rerun`, not away."""
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        try:
            (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
        except (json.JSONDecodeError, AttributeError):
            drop.append(line)
    if drop:
        with path.with_suffix(".jsonl.rerun").open("a") as f:
            f.write("\n".join(drop) + "\n")
        path.write_text("".join(line + "\n" for line in keep))


class MetricsWriter:
    """Appends one line per step and flushes it, so a killed run keeps every finished step."""

    def __init__(self, path: Path, resume_from_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None:
            truncate_after(path, resume_from_step)
        elif path.exists() and path.stat().st_size:
            # A fresh run in a used directory: keep the old file, never overwrite it.
            shutil.move(str(path), str(path.with_suffix(f".jsonl.{int(time.time())}.old")))
        self._f = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(_json_line(row))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def load_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The step rows of a run, one per step in step order (the last row of a step wins: a
    resumed run may have re-run it); UserError when there are none."""
    path = out_dir / METRICS_FILE
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is not a directory; pass the --output-dir of a training run")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the --output-dir of a training run "
                        "(it writes metrics.jsonl)")
    rows = [r for r in read_jsonl(path) if isinstance(r.get("step"), int | float)]
    if not rows:
        raise UserError(f"{path} has no step rows; let the run finish at least one step")
    by_step = {int(r["step"]): r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def append_eval(out_dir: Path, row: dict[str, Any]) -> None:
    """Append one evaluation's row to `<out_dir>/eval.jsonl` (the report plots it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / EVAL_FILE).open("a") as f:
        f.write(_json_line(row))


def read_evals(out_dir: Path) -> list[dict[str, Any]]:
    """The evaluations of a run, in step order."""
    return sorted(read_jsonl(out_dir / EVAL_FILE), key=lambda r: r.get("step", 0))


def write_config(out_dir: Path, cfg: Any) -> None:
    """The run's TrainConfig (a dataclass) as config.json."""
    (out_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def read_config(out_dir: Path) -> dict[str, Any] | None:
    """A run's config.json (None when there is none)."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}); it was not written by "
                        "`tunix-sglang train`, or was cut short") from None


def environment() -> dict[str, Any]:
    """Versions of Python and the stack, JAX's backend and devices."""
    from importlib import metadata

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    try:
        import jax

        devices = jax.devices()
        env["backend"] = jax.default_backend()
        env["devices"] = f"{len(devices)} x {devices[0].device_kind}" if devices else "none"
        env["process_count"] = jax.process_count()
    except Exception as e:  # a broken accelerator set-up must not cost the report
        env["backend"] = f"unavailable ({type(e).__name__})"
    return env


def write_environment(out_dir: Path) -> Path:
    """Record the training environment beside metrics.jsonl (call once per run)."""
    path = out_dir / ENV_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(environment(), indent=2))
    return path


def read_environment(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / ENV_FILE
    return json.loads(path.read_text()) if path.is_file() else None
