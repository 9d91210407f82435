"""`tunix-sglang train`: checks, loads, builds the Tunix cluster, runs the step loop, evaluates
before and after, and writes the report."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tunix_sglang import faults, run_files, topology
from tunix_sglang.config import TrainConfig
from tunix_sglang.data import Batches
from tunix_sglang.errors import UserError
from tunix_sglang.topology import Topology


def check_resume(cfg: TrainConfig) -> None:
    ckpt = cfg.output_path / "checkpoints" / "actor"
    if cfg.resume and not (ckpt.is_dir() and any(ckpt.iterdir())):
        raise UserError(f"--resume: no checkpoint under {ckpt}; run without --resume first")
    if not cfg.resume and ckpt.is_dir() and any(ckpt.iterdir()):
        raise UserError(
            f"{cfg.output_path} already holds checkpoints; pass --resume to continue it or "
            "choose another --output-dir"
        )


@dataclasses.dataclass
class RunInputs:
    """Everything checked and loaded before the heavy part (models, engine) starts."""

    md: Any
    tokenizer: Any
    batches: Batches
    eval_rows: list[dict[str, Any]]


def prepare(cfg: TrainConfig, topo: Topology | None) -> RunInputs:
    """Bad input and blocking environment problems fail here, before any model loads."""
    import jax

    from tunix_sglang import data, hub, models, tunix_cluster
    from tunix_sglang.doctor import check_before_train

    check_resume(cfg)
    faults.active()  # a misspelt TUNIX_SGLANG_INJECT_FAULT stops here, not mid-run
    topology.initialize(topo or Topology())
    check_before_train(cfg)  # TPU generation, TPU lock, Pathways, memory
    cfg.validate_devices(len(jax.devices()))
    md = models.inspect_model_dir(hub.model_dir(cfg.local_model_dir, cfg.model))
    problems = data.train_problems(cfg.data, cfg.data_path, cfg.seed)
    tunix_cluster.default_compilation_cache()
    tokenizer = models.load_tokenizer(md)
    rows = data.prompt_rows(problems, tokenizer, cfg.max_prompt_length, "training")
    eval_rows: list[dict[str, Any]] = []
    if cfg.eval_limit:
        held_out = data.heldout_problems(cfg.data, cfg.data_path, cfg.seed, cfg.eval_limit)
        eval_rows = data.prompt_rows(held_out, tokenizer, cfg.max_prompt_length, "held-out")
    return RunInputs(md, tokenizer, Batches(rows, cfg.batch_size, cfg.seed), eval_rows)


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


def train(cfg: TrainConfig, topo: Topology | None = None) -> dict[str, Any]:
    """Run `cfg.steps` GRPO steps; prints one line per step, accuracy, report and DONE."""
    t_start = time.perf_counter()
    import jax

    from tunix_sglang import evaluate, grpo_step, report, rewards, tunix_cluster
    from tunix_sglang.rollout.base import engine_rollout

    inputs = prepare(cfg, topo)
    cluster, algo = tunix_cluster.build_cluster(cfg, inputs.md, inputs.tokenizer)
    start = cluster.actor_trainer.train_steps  # > 0 when restored from a checkpoint
    cluster.global_steps = start
    ctx = grpo_step.StepContext(
        cluster=cluster, algo=algo, reward_fns=list(rewards.DEFAULT_REWARD_FNS), seed=cfg.seed,
        sync_check_threshold=cfg.sync_check_threshold,
    )
    out: Path = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    pid = jax.process_index()
    primary = pid == 0
    if primary:
        run_files.write_config(out, cfg)
        run_files.write_environment(out)
        if cfg.resume:
            run_files.truncate_after(out / run_files.EVAL_FILE, start)
    # Every process records its own view (losses and sync proofs must agree across hosts).
    writer = run_files.MetricsWriter(run_files.metrics_path(out, pid),
                                     resume_from_step=start if cfg.resume else None)
    console = Console(total=cfg.steps, initial=min(start, cfg.steps))
    console.line(f"Run directory: {out}")
    if start:
        console.line(f"Resumed from checkpoint at step {start}")

    def run_eval(step: int, label: str):
        # generate is a collective program: every process evaluates, process 0 records.
        if not inputs.eval_rows:
            return None
        res = evaluate.evaluate(cluster, inputs.eval_rows, cfg.max_new_tokens)
        if primary:
            evaluate.record(out, step, res)
        console.line(evaluate.format_result(res, label))
        return res

    grpo_step.initial_sync(ctx)
    before = after = last = None
    failed = False
    try:
        before = run_eval(start, f"eval at step {start}")
        for step in range(start + 1, cfg.steps + 1):
            topology.step_barrier(f"step{step}")
            last = grpo_step.run_step(ctx, inputs.batches.batch(step), step).row()
            writer.write(last)
            console.step(last)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval(step, f"eval at step {step}")
        after = run_eval(cfg.steps, f"eval at step {cfg.steps}")
    except BaseException:
        failed = True
        raise
    finally:
        console.close()
        writer.close()
        try:
            cluster.close()  # writes the last checkpoint
        except Exception as e:  # never mask the error that stopped the run
            if not failed:
                raise
            print(f"warning: final checkpoint not written: {str(e)[:200]}", file=sys.stderr)
        finally:
            engine = engine_rollout(cluster)
            if engine is not None:
                engine.close()
    if before is not None:
        print(evaluate.summary_line(before, after), flush=True)
    if primary:
        print(f"REPORT: {report.write_report(out)}", flush=True)
    elapsed = time.perf_counter() - t_start
    print(f"DONE: steps={cfg.steps} elapsed_sec={elapsed:.1f}", flush=True)
    return {"last": last, "before": before, "after": after, "elapsed_sec": elapsed}
