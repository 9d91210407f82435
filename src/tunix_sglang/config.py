"""The run's configuration: one dataclass, set from defaults < YAML file < command line."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from tunix_sglang.errors import UserError

ROLLOUT_ENGINES = ("sglang_jax", "vanilla", "sglang_jax_remote")
DATA_SOURCES = ("synthetic", "gsm8k")
# --max-prompt-length when none is given: what the data's prompts need. Synthetic prompts are
# at most 102 tokens with the embedded tokenizer; GSM8K prompts with the system prompt and a
# chat template run past 128 (Tunix's GSM8K demo uses 256). Longer ones are skipped, counted.
PROMPT_LENGTH = {"synthetic": 128, "gsm8k": 256}
# Each group names one choice: a layer (YAML, then flags) that sets one member replaces what
# an earlier layer set for the others, so `--local-model-dir D` works with a recipe naming a
# model, and `--launch-servers K` with one naming servers.
ONE_CHOICE = (("local_model_dir", "model"), ("rollout_servers", "launch_servers"))
T = TypeVar("T")


@dataclasses.dataclass
class TrainConfig:
    """Every knob of `tunix-sglang train`; the field names are the YAML keys."""

    steps: int = 10
    rollout_engine: str = "sglang_jax"
    rollout_devices: int = 0  # 0: the rollout shares every device with the trainer
    local_model_dir: str | None = None  # None: --model, else the embedded tiny model
    model: str | None = None  # Hugging Face id (ORG/NAME), fetched into the HF cache
    sglang_mem_fraction_static: float = 0.8
    multihost_mode: str = "host_local"  # sglang_jax on several processes: host_local | lockstep
    rollout_servers: str | None = None  # sglang_jax_remote: URL,URL,... started elsewhere
    launch_servers: int = 0  # sglang_jax_remote: start K local rollout servers for the run
    num_generations: int = 4
    batch_size: int = 2  # prompts per step; each gets num_generations completions
    max_prompt_length: int = PROMPT_LENGTH["synthetic"]  # build_config: PROMPT_LENGTH[data]
    max_new_tokens: int = 48
    learning_rate: float = 3e-5
    beta: float = 0.04
    epsilon: float = 0.2
    temperature: float = 1.0
    seed: int = 0
    data: str = "synthetic"
    data_path: str | None = None
    output_dir: str | None = None  # None: a new runs/run-<time> (or, with --resume, the latest)
    checkpoint_every: int = 5
    resume: bool = False
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_limit: int = 64  # held-out problems per evaluation (0: no evaluation)
    # max |Δ logprob| engine vs trainer on the sync proof's probe; None: calibrated per dtype
    sync_check_threshold: float | None = None
    dtype: str = "float32"
    target: str | None = None  # the hardware a recipe is for: what `doctor --plan` plans for

    def validate(self, num_devices: int | None = None) -> None:
        """Raise UserError (one line: problem and fix) for any bad value."""
        if self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be >= 1")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise UserError(
                f"--rollout-engine {self.rollout_engine!r} is unknown; use one of "
                f"{', '.join(ROLLOUT_ENGINES)}"
            )
        if not 0.0 < self.sglang_mem_fraction_static < 1.0:
            raise UserError(
                f"--sglang-mem-fraction-static {self.sglang_mem_fraction_static}: must be in "
                "(0, 1), e.g. 0.8"
            )
        if self.num_generations < 2:
            raise UserError(
                f"--num-generations {self.num_generations}: GRPO needs >= 2 completions per prompt"
            )
        for name in ("batch_size", "max_prompt_length", "max_new_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("eval_every", "eval_limit"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if self.multihost_mode not in ("host_local", "lockstep"):
            raise UserError(
                f"--multihost-mode {self.multihost_mode!r} is unknown; use host_local or lockstep"
            )
        if self.launch_servers < 0:
            raise UserError(f"--launch-servers {self.launch_servers}: must be >= 0")
        if self.rollout_engine == "sglang_jax_remote" and (
            bool(self.rollout_servers) == (self.launch_servers > 0)
        ):
            raise UserError(
                "--rollout-engine sglang_jax_remote needs exactly one of --rollout-servers "
                "URL,... or --launch-servers K"
            )
        if self.rollout_devices < 0:
            raise UserError(f"--rollout-devices {self.rollout_devices}: must be >= 0")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: must be > 0 for GRPO sampling")
        if self.data not in DATA_SOURCES:
            raise UserError(f"--data {self.data!r} is unknown; use one of {DATA_SOURCES}")
        if self.sync_check_threshold is not None and not self.sync_check_threshold > 0:
            raise UserError(f"--sync-check-threshold {self.sync_check_threshold}: must be > 0 "
                            "(or unset for the calibrated default of the dtype)")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"--dtype {self.dtype!r}: use float32 or bfloat16")
        check_model_choice(self.local_model_dir, self.model)
        if self.target is not None:
            from tunix_sglang.tpu_targets import get_target

            get_target(self.target)
        if num_devices is not None:
            self.validate_devices(num_devices)

    def validate_devices(self, num_devices: int) -> None:
        if self.rollout_devices > num_devices:
            raise UserError(
                f"--rollout-devices {self.rollout_devices} is larger than the {num_devices} "
                f"device(s) JAX sees; use at most {num_devices} (or 0 to share all)"
            )
        train_devices = self.train_device_count(num_devices)
        total = self.batch_size * self.num_generations
        if total % train_devices:
            raise UserError(
                f"--batch-size {self.batch_size} x --num-generations {self.num_generations} = "
                f"{total} samples cannot be split over {train_devices} training device(s); "
                f"make it a multiple of {train_devices}"
            )

    def train_device_count(self, num_devices: int) -> int:
        return len(self.split_devices(range(num_devices))[0])

    def split_devices(self, devices: Sequence[T]) -> tuple[list[T], list[T]]:
        """(training, rollout) devices: the rollout on the first --rollout-devices and the
        trainer on the rest; 0 (or all of them) shares every device."""
        devices = list(devices)
        n_roll = self.rollout_devices
        if n_roll in (0, len(devices)):
            return devices, devices
        return devices[n_roll:], devices[:n_roll]

    @property
    def output_path(self) -> Path:
        """Absolute (Orbax refuses relative checkpoint paths); resolved once, then fixed."""
        if self.output_dir is None:
            self.output_dir = str(default_output_dir(self.resume))
        return Path(self.output_dir).expanduser().resolve()


_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_choice(local_model_dir: str | None, model: str | None) -> None:
    """At most one of --local-model-dir and --model, and a model id that looks like one."""
    if local_model_dir and model:
        raise UserError("--model and --local-model-dir both name the model; pass one")
    if model is not None:
        check_model_name(model)


def check_model_name(name: str) -> None:
    """A Hugging Face model id (ORG/NAME); a one-line UserError otherwise."""
    if Path(name).expanduser().is_dir():
        raise UserError(f"--model {name}: that is a local directory; pass it as "
                        "--local-model-dir")
    if not _MODEL_NAME_RE.fullmatch(name):
        raise UserError(f"--model {name!r}: not a Hugging Face model id; use ORG/NAME, e.g. "
                        "Qwen/Qwen3-0.6B (or --local-model-dir DIR)")


EMBEDDED_ENV = "TUNIX_SGLANG_EMBEDDED_MODEL"


def embedded_is_warm() -> bool:
    """Whether runs without a model (--local-model-dir, --model) use the warm-started
    embedded model (the default), or the random tiny one (`TUNIX_SGLANG_EMBEDDED_MODEL=random`:
    plumbing checks)."""
    choice = os.environ.get(EMBEDDED_ENV, "warm")
    if choice not in ("warm", "random"):
        raise UserError(f"{EMBEDDED_ENV}={choice!r} is unknown; use 'warm' (default) or 'random'")
    return choice == "warm"


# The embedded default (no --local-model-dir: the warm-started tiny model) trains with these
# unless told otherwise: larger groups and step size than suit a real checkpoint, measured to
# raise reward and held-out accuracy on CPU in minutes (README, "An embedded default that learns").
EMBEDDED_DEFAULTS: dict[str, Any] = dict(
    steps=20, batch_size=4, num_generations=8, learning_rate=2e-4, beta=0.04
)

RUNS_DIR = Path("runs")


def default_output_dir(resume: bool) -> Path:
    """A fresh directory per run, so a repeated command never collides with an old run."""
    import time

    if resume:
        runs = sorted((p for p in RUNS_DIR.glob("run-*") if (p / "checkpoints").is_dir()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no run with checkpoints under {RUNS_DIR}/; "
                            "pass --output-dir of the run to continue")
        return runs[-1]
    return RUNS_DIR / time.strftime("run-%Y%m%d-%H%M%S")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_yaml(path: str) -> dict[str, Any]:
    """Keys of a YAML config file; unknown keys are an error (a typo must not pass)."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise UserError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: must be a mapping of keys to values")
    norm = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(norm) - set(field_names()))
    if unknown:
        raise UserError(f"--config {path}: unknown keys {unknown}; known: {field_names()}")
    return norm


def build_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults (the embedded default's when no model is given), then the YAML file, then
    command-line values that were given."""
    values: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    for group in ONE_CHOICE:
        if any(k in given for k in group):
            for k in group:
                values.pop(k, None)
    values.update(given)
    text = {f.name for f in dataclasses.fields(TrainConfig)
            if f.default is None or isinstance(f.default, str)}
    for name in text & set(values):  # YAML may give lists, numbers, mappings
        v = values[name]
        if name == "rollout_servers" and isinstance(v, list):
            v = ",".join(map(str, v))  # the YAML list form of URL,URL
        if isinstance(v, (list, dict)):
            raise UserError(f"{name}: {v!r} must be a single value, not a list or mapping")
        values[name] = v if v is None else str(v)
    if not values.get("local_model_dir") and not values.get("model") and embedded_is_warm():
        values = {**EMBEDDED_DEFAULTS, **values}
    values.setdefault("max_prompt_length", PROMPT_LENGTH.get(values.get("data", "synthetic"),
                                                             PROMPT_LENGTH["synthetic"]))
    cfg = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            v = values[f.name]
            default = getattr(cfg, f.name)
            try:
                if isinstance(default, bool):
                    v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    v = int(v)
                elif isinstance(default, float) or f.type == "float | None":
                    v = float(v)
            except (TypeError, ValueError):
                kind = "float" if f.type == "float | None" else type(default).__name__
                raise UserError(f"{f.name}: {v!r} is not a valid {kind}") from None
            setattr(cfg, f.name, v)
    cfg.validate()
    return cfg
