"""Per-step metrics: metrics.jsonl (one JSON object per step) and the console lines."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

REQUIRED_KEYS = (
    "step", "loss", "reward_mean", "reward_std", "completion_len_mean", "rollout_sec",
    "sync_sec", "train_sec", "step_sec", "weight_version", "rollout_weight_version",
    "sync_check", "sync_max_logprob_diff", "proof_sec", "mismatch_kl", "mismatch_max_abs",
)


class MetricsWriter:
    """Appends one line per step and flushes it, so a killed run keeps every finished step."""

    def __init__(self, path: Path, resume_from_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None and path.exists():
            self._truncate_after(resume_from_step)
        elif path.exists() and path.stat().st_size:
            # A fresh run in a used directory: keep the old file, never overwrite it.
            shutil.move(str(path), str(path.with_suffix(f".jsonl.{int(time.time())}.old")))
        self._f = path.open("a")

    def _truncate_after(self, step: int) -> None:
        """Steps after the checkpoint will be re-run; their old rows move aside, not away."""
        lines = self.path.read_text().splitlines()
        keep, drop = [], []
        for line in lines:
            try:
                (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
            except json.JSONDecodeError:  # a row cut by a kill
                drop.append(line)
        if drop:
            with self.path.with_suffix(".jsonl.rerun").open("a") as f:
                f.write("\n".join(drop) + "\n")
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Console:
    """The run's console: a progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, initial: int, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="step",
                            dynamic_ncols=True, disable=False)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def step(self, row: dict[str, Any]) -> None:
        self.line(f"Train step {row['step']} training loss: {row['loss']:.6f}")
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{row['reward_mean']:.2f}", loss=f"{row['loss']:.4f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
