"""Command line: `tunix-sglang train ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tunix_sglang.config import (
    DATA_SOURCES,
    EMBEDDED_DEFAULTS,
    PROMPT_LENGTH,
    ROLLOUT_ENGINES,
    TrainConfig,
    build_config,
)
from tunix_sglang.errors import UserError
from tunix_sglang.protocol import TOKEN_ENV

# (flag, type, help); the default shown comes from TrainConfig, so YAML can still set it.
_TRAIN_FLAGS: list[tuple[str, type, str]] = [
    ("--steps", int, "optimizer steps"),
    ("--rollout-engine", str, f"one of {', '.join(ROLLOUT_ENGINES)}"),
    ("--rollout-devices", int, "devices for the rollout engine, the rest train (0: share all)"),
    ("--local-model-dir", str, "Hugging Face style model dir (config.json, *.safetensors, "
     "tokenizer); unset: --model, else the embedded tiny Qwen3"),
    ("--model", str, "Hugging Face model id (ORG/NAME), fetched into the Hugging Face cache "
     "($HF_HOME) when the hub is reachable, the cached copy otherwise"),
    ("--sglang-mem-fraction-static", float, "share of device memory for the engine, in (0, 1)"),
    ("--multihost-mode", str, "sglang_jax on several processes: host_local (one engine per "
     "host) or lockstep (one engine spanning hosts; experimental on 0.0.2)"),
    ("--rollout-servers", str, "sglang_jax_remote: rollout server URLs, comma-separated"),
    ("--launch-servers", int, "sglang_jax_remote: start K local rollout servers for the run"),
    ("--num-generations", int, "completions per prompt (GRPO group size)"),
    ("--batch-size", int, "prompts per step"),
    ("--max-prompt-length", int, "prompt tokens; longer prompts are skipped"),
    ("--max-new-tokens", int, "completion tokens"),
    ("--learning-rate", float, "AdamW learning rate"),
    ("--beta", float, "KL coefficient against the reference model"),
    ("--epsilon", float, "PPO-style clip range"),
    ("--temperature", float, "sampling temperature"),
    ("--seed", int, "seed for data order and sampling"),
    ("--data", str, f"one of {', '.join(DATA_SOURCES)}"),
    ("--data-path", str, "GSM8K jsonl/parquet file or directory (unset: HF openai/gsm8k)"),
    ("--output-dir", str, "metrics.jsonl, checkpoints/, tensorboard/, config.json"),
    ("--checkpoint-every", int, "steps between checkpoints"),
    ("--eval-every", int, "steps between held-out greedy evaluations (0: before/after only)"),
    ("--eval-limit", int, "held-out problems per evaluation (0: none)"),
    ("--sync-check-threshold", float, "max |Δ logprob| engine vs trainer on the sync proof's "
     "probe (None: 1e-3 for float32 engines; for bfloat16 0.1 x the largest probe logit, "
     "at least 0.25)"),
    ("--dtype", str, "float32 or bfloat16"),
]


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="GRPO on GSM8K-style math (embedded tiny model by default)")
    p.add_argument("--config", help="YAML file with any of these keys (flags override it)")
    defaults = TrainConfig()
    for flag, typ, text in _TRAIN_FLAGS:
        name = flag[2:].replace("-", "_")
        default = f"{getattr(defaults, name)}"
        if name == "max_prompt_length":
            default = ", ".join(f"{k} {v}" for k, v in PROMPT_LENGTH.items())
        if name in EMBEDDED_DEFAULTS:
            default += f"; embedded model: {EMBEDDED_DEFAULTS[name]}"
        p.add_argument(flag, type=typ, help=f"{text} (default: {default})")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the last checkpoint in --output-dir")
    p.add_argument("--server-token", help=f"shared token for rollout servers (or env "
                   f"{TOKEN_ENV}); never written to config.json")
    g = p.add_argument_group("multi-host (set by `tunix-sglang launch`; on TPU auto-detected)")
    g.add_argument("--coordinator-address", help="host:port of process 0")
    g.add_argument("--num-processes", type=int, help="processes in the JAX cluster")
    g.add_argument("--process-id", type=int, help="this process's index")


def _quiet_logs() -> None:
    """Keep the console to one line per step: library INFO logs go nowhere by default."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tunix_sglang.topology import default_platform

    default_platform()
    if os.environ.get("TUNIX_SGLANG_VERBOSE"):
        return
    # sglang-jax draws progress bars for its precompiles; ours (Console) opts back in.
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger().setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunix-sglang", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    from tunix_sglang.doctor import add_doctor_parser
    from tunix_sglang.evaluate import add_eval_parser
    from tunix_sglang.launch import add_launch_parser
    from tunix_sglang.report import add_report_parser
    from tunix_sglang.server import add_serve_parser

    add_eval_parser(sub)
    add_report_parser(sub)
    add_launch_parser(sub)
    add_doctor_parser(sub)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    _quiet_logs()
    try:
        if args.command == "train":
            from tunix_sglang.topology import Topology

            topo_keys = ("coordinator_address", "num_processes", "process_id")
            topo = Topology.from_env(*(getattr(args, k) for k in topo_keys))
            if args.server_token:
                os.environ[TOKEN_ENV] = args.server_token
            skip = ("command", "config", "server_token", *topo_keys)
            overrides = {k: v for k, v in vars(args).items() if k not in skip}
            cfg = build_config(args.config, overrides)
            from tunix_sglang.runner import train

            train(cfg, topo)
        elif args.command == "eval":
            from tunix_sglang.evaluate import eval_main

            return eval_main(args)
        elif args.command == "report":
            from tunix_sglang.report import report_main

            return report_main(args)
        elif args.command == "doctor":
            from tunix_sglang.doctor import doctor_main

            return doctor_main(args)
        elif args.command == "serve":
            from tunix_sglang.server import serve_main

            return serve_main(args)
        elif args.command == "launch":
            from tunix_sglang.launch import launch

            return launch(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        # Failures the run detects itself (a sync that did not arrive, hosts out of step):
        # one line, not a traceback. Anything else keeps its traceback.
        from tunix_sglang.probe import SyncCheckError
        from tunix_sglang.topology import DesyncError

        if not isinstance(e, (SyncCheckError, DesyncError)):
            raise
        from tunix_sglang.faults import ENV

        injected = f" [{ENV}={os.environ[ENV]} is set]" if os.environ.get(ENV) else ""
        print(f"error: {e}{injected}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
