"""`<output-dir>/report.html`: a run's curves, accuracy, configuration and environment.

One self-contained file: the plots are PNGs (matplotlib, Agg backend) embedded as base64 data
URIs, no scripts and no external resources, so it opens anywhere without a network.

Inputs, all in the run's output directory (`run_files`): `metrics.jsonl` (required),
`eval.jsonl`, `config.json`, `environment.json` (without it the report shows the environment
it is generated in), `tensorboard/` (listed).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from tunix_sglang import run_files
from tunix_sglang.errors import UserError

REPORT_FILE = "report.html"


# ------------------------------------------------------------------------------- plots


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")


def plot_reward(rows: list[dict[str, Any]]) -> str:
    fig, ax = _figure("Reward per step (mean ± std over the step's completions)", "reward")
    xs, mean = _series(rows, "reward_mean")
    _, std = _series(rows, "reward_std")
    if xs:
        ax.plot(xs, mean, marker="o", ms=3, color="#1f77b4", label="mean")
        if len(std) == len(mean):
            ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color="#1f77b4", alpha=0.2, label="± std")
        ax.legend(loc="best")
    else:
        _no_data(ax, "no reward_mean in metrics.jsonl")
    return _png(fig)


def plot_reward_fns(rows: list[dict[str, Any]]) -> str:
    fig, ax = _figure("Mean reward of each reward function", "reward")
    keys = sorted({k for r in rows for k in r if k.startswith("reward/")})
    for k in keys:
        xs, ys = _series(rows, k)
        ax.plot(xs, ys, marker=".", label=k.split("/", 1)[1])
    if keys:
        ax.legend(loc="best", fontsize=8)
    else:
        _no_data(ax, "no reward/<fn> columns in metrics.jsonl")
    return _png(fig)


def plot_single(rows: list[dict[str, Any]], key: str, title: str, ylabel: str,
                color: str, log: bool = False) -> str:
    fig, ax = _figure(title, ylabel)
    xs, ys = _series(rows, key)
    if xs:
        ax.plot(xs, ys, marker="o", ms=3, color=color)
        if log and any(y > 0 for y in ys):
            ax.set_yscale("symlog", linthresh=1e-9)  # zeros (shared weights) stay visible
    else:
        _no_data(ax, f"no {key} in metrics.jsonl")
    return _png(fig)


def plot_mismatch(rows: list[dict[str, Any]]) -> str:
    """Trainer vs engine logprobs of the rollout's own tokens, per step."""
    fig, ax = _figure("Train-inference mismatch on the rollout tokens", "nats (log scale)")
    drawn = False
    for key, color, label in (("mismatch_kl", "#17becf", "mean k3 KL(engine || trainer)"),
                              ("mismatch_max_abs", "#bcbd22", "max |Δ logprob|")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, color=color, label=label)
            drawn = True
    if drawn:
        ax.set_yscale("symlog", linthresh=1e-12)
        ax.legend(loc="best", fontsize=8)
    else:
        _no_data(ax, "no mismatch figures (the rollout returns no logprobs, or shares the "
                     "trainer's model)")
    return _png(fig)


def plot_eval(evals: list[dict[str, Any]]) -> str:
    fig, ax = _figure("Held-out accuracy (greedy pass@1)", "accuracy")
    if evals:
        for key, color in (("strict_acc", "#2ca02c"), ("lenient_acc", "#ff7f0e")):
            xs, ys = _series(evals, key)
            ax.plot(xs, ys, marker="o", color=color, label=key.replace("_acc", " (answer tag)"
                                                                       if key == "strict_acc"
                                                                       else " (last number)"))
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best")
    else:
        _no_data(ax, "no evaluations (train with --eval-every N, or run `tunix-sglang eval`)")
    return _png(fig)


def plot_times(rows: list[dict[str, Any]]) -> str:
    fig, ax = _figure("Time per step: rollout / weight sync / train", "seconds")
    steps = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, color in (("rollout_sec", "#1f77b4"), ("sync_sec", "#d62728"),
                       ("train_sec", "#2ca02c")):
        vals = [float(r.get(key) or 0.0) for r in rows]
        ax.bar(steps, vals, bottom=bottom, color=color, label=key[:-4], width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    xs, ys = _series(rows, "step_sec")
    if xs:
        ax.plot(xs, ys, color="black", lw=1, marker=".", label="step total")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def plots(rows: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for every plot of the report, in order."""
    return [
        ("Reward", plot_reward(rows)),
        ("Reward by function", plot_reward_fns(rows)),
        ("Eval accuracy", plot_eval(evals)),
        ("Loss", plot_single(rows, "loss", "Training loss (Tunix GRPO)", "loss", "#9467bd")),
        ("Completion length", plot_single(rows, "completion_len_mean",
                                          "Mean completion length", "tokens", "#8c564b")),
        ("Time per step", plot_times(rows)),
        ("Weight sync", plot_single(rows, "sync_max_logprob_diff",
                                    "Weight sync proof: max |Δ logprob| on the probe's top-16 "
                                    "tokens, engine vs trainer", "max |Δ logprob|", "#e377c2",
                                    log=True)),
        ("Train-inference mismatch", plot_mismatch(rows)),
    ]


# -------------------------------------------------------------------------------- html


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(pairs: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in pairs)
    return f"<table>{body}</table>"


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return sum(vals) / len(vals) if vals else None


def summary(rows: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Headline numbers: reward early vs late, accuracy before vs after, timings."""
    k = max(1, len(rows) // 5)  # first / last fifth of the run, so one noisy step can't decide
    out: list[tuple[str, Any]] = [
        ("steps", f"{rows[0]['step']} – {rows[-1]['step']} ({len(rows)} rows)"),
        (f"reward mean, first {k} step(s)", _mean(rows[:k], "reward_mean")),
        (f"reward mean, last {k} step(s)", _mean(rows[-k:], "reward_mean")),
    ]
    if evals:
        first, last = evals[0], evals[-1]
        out += [
            (f"strict accuracy, step {first['step']} → {last['step']}",
             f"{_fmt(first.get('strict_acc'))} → {_fmt(last.get('strict_acc'))}"),
            (f"lenient accuracy, step {first['step']} → {last['step']}",
             f"{_fmt(first.get('lenient_acc'))} → {_fmt(last.get('lenient_acc'))}"),
            ("eval problems", last.get("n")),
        ]
    for key in ("step_sec", "rollout_sec", "sync_sec", "train_sec"):
        out.append((f"mean {key}", _mean(rows, key)))
    total = sum(float(r.get("step_sec") or 0.0) for r in rows)
    out.append(("total step time (s)", total))
    checks = sorted({str(r.get("sync_check")) for r in rows if r.get("sync_check")})
    if checks:
        out.append(("weight sync proof", ", ".join(checks)))
    for key, label in (("sync_max_logprob_diff", "max sync proof |Δ logprob| over the run"),
                       ("mismatch_kl", "max mismatch_kl (rollout tokens)"),
                       ("mismatch_max_abs", "max mismatch_max_abs (rollout tokens)")):
        vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if vals:
            out.append((label, max(vals)))
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1100px}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f5f5f5;font-weight:600}
figure{margin:12px 0} img.plot{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:1px 4px}
"""


def render_html(out_dir: Path, rows: list[dict[str, Any]], evals: list[dict[str, Any]],
                config: dict[str, Any] | None, env: dict[str, Any], env_source: str) -> str:
    figs = "".join(
        f'<figure><img class="plot" alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{png}"></figure>'
        for title, png in plots(rows, evals)
    )
    tb = out_dir / "tensorboard"
    events = sorted(p.relative_to(out_dir).as_posix() for p in tb.rglob("events.out.tfevents*")) \
        if tb.is_dir() else []
    tb_text = (f"TensorBoard event files ({len(events)}) in <code>{html.escape(str(tb))}</code>: "
               f"<code>tensorboard --logdir {html.escape(str(tb))}</code>"
               if events else "No TensorBoard event files in this directory.")
    eval_table = ""
    if evals:
        head = "<tr><th>step</th><th>n</th><th>strict</th><th>lenient</th><th>reward</th></tr>"
        body = "".join(
            f"<tr><td>{e.get('step')}</td><td>{e.get('n')}</td>"
            f"<td>{_fmt(e.get('strict_acc'))}</td><td>{_fmt(e.get('lenient_acc'))}</td>"
            f"<td>{_fmt(e.get('reward_mean'))}</td></tr>" for e in evals)
        eval_table = f"<h2>Evaluations</h2><table>{head}{body}</table>"
    cfg_html = (_table(sorted(config.items())) if config
                else "<p>No config.json in this directory.</p>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>tunix-sglang run: {html.escape(out_dir.name)}</title><style>{_CSS}</style>"
        "</head><body>"
        f"<h1>tunix-sglang run <code>{html.escape(str(out_dir))}</code></h1>"
        f"<h2>Summary</h2>{_table(summary(rows, evals))}"
        f"<h2>Curves</h2>{figs}{eval_table}"
        f"<h2>Configuration</h2>{cfg_html}"
        f"<h2>Environment ({html.escape(env_source)})</h2>{_table(list(env.items()))}"
        f"<h2>Files</h2><p>Per-step rows: <code>metrics.jsonl</code>. {tb_text}</p>"
        "</body></html>"
    )


def write_report(out_dir: str | Path) -> Path:
    """Write `<out_dir>/report.html` from the run's files; returns its path."""
    out = Path(out_dir)
    rows = run_files.load_metrics(out)
    evals = run_files.read_evals(out)
    try:
        config = run_files.read_config(out)
    except UserError:
        config = {"config.json": "unreadable"}
    env, source = run_files.read_environment(out), "recorded by the run"
    if env is None:
        env, source = run_files.environment(), "where this report was generated"
    path = out / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(out, rows, evals, config, env, source), encoding="utf-8")
    tmp.replace(path)  # never leave a half-written report behind
    return path


# ---------------------------------------------------------------------- `tunix-sglang report`


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write <output-dir>/report.html (plots, config, env)")
    p.add_argument("output_dir", help="a `tunix-sglang train` --output-dir")
    return p


def report_main(args: argparse.Namespace) -> int:
    path = write_report(args.output_dir)
    print(f"REPORT: {path}", flush=True)
    return 0
