"""`tunix-sglang train`: builds the models, data, Tunix cluster and rollout, then runs steps."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunix_sglang import cluster as cluster_lib
from tunix_sglang import faults
from tunix_sglang.cluster import Topology
from tunix_sglang.config import TrainConfig
from tunix_sglang.errors import UserError


def default_compilation_cache() -> None:
    """A persistent JAX compilation cache unless the user chose one (restarts skip compiles)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "tunix-sglang", "jax"))


@dataclasses.dataclass
class Batches:
    """Deterministic batches: the rows of step s depend only on (seed, s), so resume is exact."""

    rows: list[dict[str, Any]]
    batch_size: int
    seed: int

    def batch(self, step: int) -> dict[str, np.ndarray]:
        n = len(self.rows)
        start = (step - 1) * self.batch_size
        picked = []
        for i in range(start, start + self.batch_size):
            epoch, pos = divmod(i, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            picked.append(self.rows[order[pos]])
        return self._columns(picked)

    def refill(self, step: int, round_: int) -> dict[str, np.ndarray]:
        """Further prompts for round `round_` >= 1 of step's dynamic sampling: they depend
        only on (seed, step, round) too. (numpy pads seeds with zeros, so round >= 1 keeps
        this stream apart from the batches' [seed, epoch].)"""
        n = len(self.rows)
        rng = np.random.default_rng([self.seed, step, round_])
        picked = rng.choice(n, self.batch_size, replace=n < self.batch_size)
        return self._columns([self.rows[i] for i in picked])

    @staticmethod
    def _columns(picked: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        # Tunix needs numpy arrays, not lists of str (lists are split per character).
        return {k: np.array([r[k] for r in picked]) for k in picked[0]}


def load_problems(cfg: TrainConfig):
    from tunix_sglang import data

    if cfg.data == "synthetic":
        train, _ = data.synthetic_split(n_train=2000, n_test=200, seed=cfg.seed)
        return train
    return data.load_gsm8k(cfg.data_path, split="train")


def build_meshes(cfg: TrainConfig):
    """Actor/reference on the training devices, rollout on the first N (or all, shared)."""
    import jax

    devices = jax.devices()
    cfg.validate_devices(len(devices))
    train_devs, roll_devs = cfg.split_devices(devices)
    axis = (jax.sharding.AxisType.Auto,) * 2

    def mesh(devs):
        return jax.sharding.Mesh(np.array(devs).reshape(len(devs), 1), ("fsdp", "tp"),
                                 axis_types=axis)

    train_mesh = mesh(train_devs)
    return train_mesh, (train_mesh if roll_devs == train_devs else mesh(roll_devs))


def train_rollout_config(cfg: TrainConfig, eos_tokens: list[int]):
    """Tunix's RolloutConfig for training: the rollout's shapes and sampling."""
    from tunix.rl.rollout import base_rollout

    return base_rollout.RolloutConfig(
        max_tokens_to_generate=cfg.max_new_tokens,
        max_prompt_length=cfg.max_prompt_length,
        kv_cache_size=cfg.max_prompt_length + cfg.max_new_tokens + 16,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=None,
        eos_tokens=eos_tokens,
        rollout_sglang_jax_mem_fraction_static=cfg.sglang_mem_fraction_static,
    )


def build_cluster(cfg: TrainConfig, md, tokenizer):
    """Tunix RLCluster + GRPO config for this run (restores the last checkpoint if resuming)."""
    import optax
    import orbax.checkpoint as ocp
    from tunix.rl import rl_cluster as rl
    from tunix.sft import metrics_logger

    from tunix_sglang import algorithms, models, rewards, rollout

    train_mesh, rollout_mesh = build_meshes(cfg)
    actor = models.load_model(md, train_mesh, cfg.dtype)
    reference = models.load_model(md, train_mesh, cfg.dtype) if cfg.beta else None
    out = cfg.output_path
    training_config = rl.RLTrainingConfig(
        actor_optimizer=optax.adamw(cfg.learning_rate, b1=0.9, b2=0.99, weight_decay=0.1),
        eval_every_n_steps=10**9,
        max_steps=None,  # the step loop is ours; Tunix's own bar would duplicate the console
        checkpoint_root_directory=str(out / "checkpoints"),
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.checkpoint_every, max_to_keep=3
        ),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=str(out / "tensorboard"), flush_every_n_steps=1
        ),
    )
    rollout_config = train_rollout_config(cfg, [tokenizer.eos_token_id])
    from tunix_sglang import evaluate

    cluster_config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: train_mesh, rl.Role.REFERENCE: train_mesh,
                      rl.Role.ROLLOUT: rollout_mesh},
        rollout_engine=rollout.engine_for(cfg, md),
        training_config=training_config,
        rollout_config=evaluate.rollout_configs(rollout_config),  # TRAIN samples, EVAL greedy
    )
    cluster = rl.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                           cluster_config=cluster_config)
    algo, learner = algorithms.tunix_config(cfg)
    # The learner wires the algorithm's loss into the actor trainer; its loop is not used.
    learner(rl_cluster=cluster, algo_config=algo, reward_fns=list(rewards.DEFAULT_REWARD_FNS))
    return cluster, algo


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

    from tunix_sglang import data, evaluate, hub, models
    from tunix_sglang.doctor import check_before_train

    check_resume(cfg)
    faults.active()  # a misspelt TUNIX_SGLANG_INJECT_FAULT stops here, not mid-run
    cluster_lib.initialize(topo or Topology())
    check_before_train(cfg)  # TPU generation, TPU lock, Pathways, memory
    cfg.validate_devices(len(jax.devices()))
    md = models.inspect_model_dir(hub.model_dir(cfg.local_model_dir, cfg.model))
    problems = load_problems(cfg)
    default_compilation_cache()
    tokenizer = models.load_tokenizer(md)
    rows = data.fit_prompts(data.to_dataset_rows(problems, tokenizer), tokenizer,
                            cfg.max_prompt_length, "training")
    eval_rows: list[dict[str, Any]] = []
    if cfg.eval_limit:
        held_out = evaluate.heldout_problems(cfg.data, cfg.data_path, cfg.seed, cfg.eval_limit)
        eval_rows = evaluate.eval_rows(held_out, tokenizer, cfg.max_prompt_length)
    return RunInputs(md, tokenizer, Batches(rows, cfg.batch_size, cfg.seed), eval_rows)


def train(cfg: TrainConfig, topo: Topology | None = None) -> dict[str, Any]:
    """Run `cfg.steps` GRPO steps; prints one line per step, accuracy, report and DONE."""
    t_start = time.perf_counter()
    import jax

    from tunix_sglang import algorithms, evaluate, grpo_step, report, rewards
    from tunix_sglang.metrics import Console, MetricsWriter

    inputs = prepare(cfg, topo)
    cluster, algo = build_cluster(cfg, inputs.md, inputs.tokenizer)
    start = cluster.actor_trainer.train_steps  # > 0 when restored from a checkpoint
    cluster.global_steps = start
    ctx = grpo_step.StepContext(
        cluster=cluster, algo=algo, reward_fns=list(rewards.DEFAULT_REWARD_FNS), seed=cfg.seed,
        sync_check_threshold=cfg.sync_check_threshold,
        max_resample_rounds=algorithms.max_resample_rounds(cfg), refill=inputs.batches.refill,
    )
    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        report.write_environment(out)
        if cfg.resume:
            evaluate.truncate_evals(out, start)
    # Every process records its own view (losses and sync proofs must agree across hosts).
    pid = jax.process_index()
    metrics_name = "metrics.jsonl" if primary else f"metrics.process{pid}.jsonl"
    writer = MetricsWriter(out / metrics_name, resume_from_step=start if cfg.resume else None)
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
            evaluate.append_eval(out, step, res)
        console.line(evaluate.format_result(res, label))
        return res

    grpo_step.initial_sync(ctx)
    before = after = last = None
    failed = False
    try:
        before = run_eval(start, f"eval at step {start}")
        for step in range(start + 1, cfg.steps + 1):
            cluster_lib.step_barrier(f"step{step}")
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
            close = getattr(cluster.rollout, "close", None)
            if close:
                close()
    if before is not None:
        print(evaluate.summary_line(before, after), flush=True)
    if primary:
        print(f"REPORT: {report.write_report(out)}", flush=True)
    elapsed = time.perf_counter() - t_start
    print(f"DONE: steps={cfg.steps} elapsed_sec={elapsed:.1f}", flush=True)
    return {"last": last, "before": before, "after": after, "elapsed_sec": elapsed}
