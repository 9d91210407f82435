"""Greedy pass@1 accuracy on a held-out split, through the run's own rollout engine.

`evaluate` generates through Tunix's `RLCluster.generate(..., mode=Mode.EVAL)`, so evaluation
uses exactly the engine (vanilla sampler or sglang-jax) and the weights training uses; the
cluster's EVAL rollout config is greedy for every engine (`tunix_cluster.eval_rollout_config`).

Two extractions are reported (`rewards.correct`): strict reads the `<answer>` tag, lenient the
last number anywhere in the completion.

`tunix-sglang eval` evaluates a model directory or the last checkpoint of a run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunix_sglang import data, run_files, tunix_cluster
from tunix_sglang.config import PROMPT_LENGTH
from tunix_sglang.errors import UserError

DEFAULT_EVAL_BATCH = 16


@dataclasses.dataclass
class EvalResult:
    """Accuracy of greedy completions on `n` held-out problems."""

    n: int
    strict_acc: float
    lenient_acc: float
    reward_mean: float
    samples: list[dict[str, Any]]
    eval_sec: float = 0.0

    def row(self, step: int) -> dict[str, Any]:
        """The eval.jsonl line for this result (samples left out: they are large)."""
        return {
            "step": step, "n": self.n, "strict_acc": self.strict_acc,
            "lenient_acc": self.lenient_acc, "reward_mean": self.reward_mean,
            "eval_sec": self.eval_sec,
        }


def evaluate(
    cluster: Any,
    rows: list[dict[str, Any]],
    max_new_tokens: int | None = None,
    batch_size: int = DEFAULT_EVAL_BATCH,
    num_samples: int = 3,
) -> EvalResult:
    """Greedy pass@1 over `rows` (dicts with `prompts` and gold `answer`) in EVAL mode.

    Batches are padded to `batch_size` by repeating the last prompt, so every call has one
    shape and the engine compiles once.
    """
    from tunix.rl.rl_cluster import Mode

    from tunix_sglang import rewards

    if not rows:
        raise UserError("nothing to evaluate: the held-out split is empty")
    t0 = time.perf_counter()
    completions: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = [str(r["prompts"]) for r in rows[start : start + batch_size]]
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        out = cluster.generate(prompts=chunk, mode=Mode.EVAL,
                               max_generation_steps=max_new_tokens)
        completions += list(out.text)[:real]
    golds = [str(r["answer"]) for r in rows]
    strict = [rewards.correct(c, g, strict=True) for c, g in zip(completions, golds, strict=True)]
    lenient = [rewards.correct(c, g, strict=False) for c, g in zip(completions, golds, strict=True)]
    prompts = [str(r["prompts"]) for r in rows]
    total = np.zeros(len(rows), np.float32)
    for fn in rewards.DEFAULT_REWARD_FNS:
        total += np.asarray(fn(prompts=prompts, completions=completions, answer=golds), np.float32)
    samples = [
        {"question": str(r.get("question", "")), "gold": g, "completion": c,
         "strict": s, "lenient": le}
        for r, g, c, s, le in zip(rows, golds, completions, strict, lenient, strict=True)
    ][:num_samples]
    return EvalResult(
        n=len(rows), strict_acc=float(np.mean(strict)), lenient_acc=float(np.mean(lenient)),
        reward_mean=float(np.mean(total)), samples=samples, eval_sec=time.perf_counter() - t0,
    )


def record(out_dir: Path, step: int, result: EvalResult) -> None:
    """Append this evaluation to the run's eval.jsonl (the report plots it)."""
    run_files.append_eval(out_dir, result.row(step))


def format_result(result: EvalResult, label: str = "eval") -> str:
    return (f"{label}: strict_acc={result.strict_acc:.3f} lenient_acc={result.lenient_acc:.3f} "
            f"reward_mean={result.reward_mean:.3f} n={result.n}")


def summary_line(before: EvalResult | None, after: EvalResult | None) -> str:
    """`accuracy before -> after` for the run's final summary."""
    def acc(r: EvalResult | None, key: str) -> str:
        return "n/a" if r is None else f"{getattr(r, key):.3f}"

    return (f"ACCURACY: strict {acc(before, 'strict_acc')} -> {acc(after, 'strict_acc')}, "
            f"lenient {acc(before, 'lenient_acc')} -> {acc(after, 'lenient_acc')} "
            f"(greedy pass@1, n={(after or before).n if (after or before) else 0})")


# ----------------------------------------------------------------------- `tunix-sglang eval`


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="greedy pass@1 accuracy of a model or a run's last checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--local-model-dir",
                     help="Hugging Face model directory (default: the embedded model)")
    src.add_argument("--model", help="Hugging Face model id (ORG/NAME), fetched into the "
                     "Hugging Face cache when the hub is reachable, the cached copy otherwise")
    src.add_argument("--run-dir", help="a `tunix-sglang train` output dir: its last checkpoint")
    p.add_argument("--data", default=None, help="synthetic or gsm8k (default: the run's, else "
                   "synthetic)")
    p.add_argument("--data-path", default=None, help="GSM8K file or dir (test split is used)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    p.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH,
                   help=f"prompts per generate call (default {DEFAULT_EVAL_BATCH})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion tokens (default: the run's, else TrainConfig's)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="prompt tokens; longer prompts are skipped, counted (default: the "
                   "run's, else " + ", ".join(f"{k} {v}" for k, v in PROMPT_LENGTH.items())
                   + ")")
    p.add_argument("--rollout-engine", default=None, help="default: the run's, else vanilla")
    p.add_argument("--seed", type=int, default=None, help="synthetic split seed (default: run's)")
    p.add_argument("--json", default=None, help="also write the result (with samples) here")
    return p


def eval_config(args: argparse.Namespace):
    """The TrainConfig the evaluated model would be trained with (rollout knobs, data)."""
    from tunix_sglang.config import TrainConfig, field_names

    cfg = TrainConfig()
    if args.run_dir:
        run = Path(args.run_dir).expanduser().resolve()  # Orbax wants an absolute path
        saved = run_files.read_config(run)
        if saved is None:
            raise UserError(f"--run-dir {run}: no config.json; pass a `tunix-sglang train` "
                            "--output-dir")
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in field_names()})
        ckpt = run / "checkpoints" / "actor"
        if not (ckpt.is_dir() and any(ckpt.iterdir())):
            raise UserError(f"--run-dir {run}: no checkpoint under {ckpt}; train first")
    else:
        cfg.local_model_dir, cfg.model = args.local_model_dir, args.model
    for key in ("data", "data_path", "max_new_tokens", "rollout_engine", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.max_prompt_length is not None:
        cfg.max_prompt_length = args.max_prompt_length
    elif not args.run_dir:
        cfg.max_prompt_length = PROMPT_LENGTH.get(cfg.data, cfg.max_prompt_length)
    # Evaluation needs no reference model and must not touch the run's own files.
    cfg.beta, cfg.resume, cfg.num_generations = 0.0, False, 2
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    # The engine is built for one generate call's prompts; the 2 "generations" only satisfy
    # GRPO's config and make the count split over 2, 4, 8... training devices.
    cfg.batch_size = args.batch_size
    cfg.validate()
    return cfg


def restore_actor(cluster: Any, run_dir: Path) -> int:
    """Load the run's last actor checkpoint into the cluster and give it to the rollout."""
    from flax import nnx
    from tunix.sft import checkpoint_manager

    from tunix_sglang.rollout.base import engine_rollout

    manager = checkpoint_manager.CheckpointManager(str(run_dir / "checkpoints" / "actor"))
    actor = cluster.actor_trainer.model
    step, _ = manager.maybe_restore(actor)
    manager.close()
    engine = engine_rollout(cluster)
    if engine is not None:  # Tunix's own sampler is the actor: restored already
        engine.update_params(nnx.state(actor, nnx.Param), (nnx.Param,))
    return step


def run_eval(args: argparse.Namespace) -> tuple[EvalResult, int]:
    """Build the cluster as training does, restore if asked, evaluate; (result, step)."""
    from tunix_sglang import hub, models
    from tunix_sglang.rollout.base import engine_rollout

    cfg = eval_config(args)
    problems = data.heldout_problems(cfg.data, cfg.data_path, cfg.seed, args.limit)
    md = models.inspect_model_dir(hub.model_dir(cfg.local_model_dir, cfg.model))
    tunix_cluster.default_compilation_cache()
    tokenizer = models.load_tokenizer(md)
    rows = data.prompt_rows(problems, tokenizer, cfg.max_prompt_length, "held-out")
    with tempfile.TemporaryDirectory(prefix="tunix-sglang-eval-") as tmp:
        cfg.output_dir = tmp  # the cluster's own checkpoints/tensorboard go to scratch
        cfg.local_model_dir, cfg.model = str(md.path), None
        cluster, _ = tunix_cluster.build_cluster(cfg, md, tokenizer)
        engine = engine_rollout(cluster)
        try:
            run_dir = Path(args.run_dir).expanduser().resolve() if args.run_dir else None
            step = restore_actor(cluster, run_dir) if run_dir else 0
            result = evaluate(cluster, rows, cfg.max_new_tokens, args.batch_size)
        finally:
            if engine is not None:
                engine.close()
    return result, step


def eval_main(args: argparse.Namespace) -> int:
    """`tunix-sglang eval`: prints strict/lenient accuracy; `--json` writes the full result."""
    result, step = run_eval(args)
    where = (f"{args.run_dir} step {step}" if args.run_dir
             else (args.local_model_dir or args.model or "default"))
    print(format_result(result, f"eval [{where}]"), flush=True)
    if args.json:
        out = dataclasses.asdict(result) | {"step": step, "source": where}
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in out.items()}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
