"""report.html: every plot is a real PNG, errors are one clear line, Chromium renders it."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tunix_sglang import report, run_files
from tunix_sglang.errors import UserError
from tunix_sglang.evaluate import EvalResult, record

PLOT_RE = re.compile(r'<img class="plot" alt="([^"]*)" src="data:image/png;base64,([^"]+)"')


def fake_run(out: Path, steps: int = 12) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({
                "step": s, "loss": 0.01 * (-1) ** s, "reward_mean": 0.3 * s,
                "reward_std": 1.0, "completion_len_mean": 30 - s, "rollout_sec": 0.5,
                "sync_sec": 0.05, "train_sec": 0.6, "step_sec": 1.2, "weight_version": s,
                "sync_max_logprob_diff": 0.0 if s % 2 else 1e-7, "sync_check": "proven",
                "mismatch_kl": 1e-12 * s, "mismatch_max_abs": 1e-6 * s,
                "reward/check_answer": 0.1 * s, "reward/match_format_exactly": 0.2 * s,
            }) + "\n")
        f.write('{"step": 13, "loss"')  # a row cut by a kill must not break the report
    (out / "config.json").write_text(json.dumps({"steps": steps, "learning_rate": 1e-3}))
    for step, acc in ((0, 0.1), (steps, 0.4)):
        record(out, step, EvalResult(n=50, strict_acc=acc, lenient_acc=acc + 0.1,
                                          reward_mean=acc * 5, samples=[]))
    return out


def decoded_plots(html_text: str) -> list[tuple[str, Image.Image]]:
    return [(alt, Image.open(io.BytesIO(base64.b64decode(data))))
            for alt, data in PLOT_RE.findall(html_text)]


def distinct_colours(img: Image.Image) -> int:
    small = img.convert("RGB").resize((200, 200))
    return len(set(small.getdata()))


def test_report_has_every_plot_as_png(tmp_path):
    out = fake_run(tmp_path / "run")
    path = report.write_report(out)
    assert path == out / "report.html"
    text = path.read_text()
    plots = decoded_plots(text)
    titles = [t for t, _ in plots]
    assert titles == ["Reward", "Reward by function", "Eval accuracy", "Loss",
                      "Completion length", "Time per step", "Weight sync",
                      "Train-inference mismatch"]
    for title, img in plots:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 150, title
        assert distinct_colours(img) > 20, f"plot {title!r} looks blank"
    # Offline by construction: nothing is fetched from anywhere.
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for needle in ("learning_rate", "jax", "google-tunix", "sglang-jax", "backend",
                   "strict accuracy, step 0 → 12", "0.1 → 0.4", "weight sync proof",
                   "max mismatch_kl (rollout tokens)"):
        assert needle in text, needle


def test_report_cli_entry_and_recorded_environment(tmp_path, capsys):
    out = fake_run(tmp_path / "run")
    env = run_files.write_environment(out)
    assert json.loads(env.read_text())["python"]
    parser = argparse.ArgumentParser()
    report.add_report_parser(parser.add_subparsers(dest="command"))
    assert report.report_main(parser.parse_args(["report", str(out)])) == 0
    assert f"REPORT: {out / 'report.html'}" in capsys.readouterr().out
    assert "recorded by the run" in (out / "report.html").read_text()


def test_report_without_evals_still_shows_every_plot(tmp_path):
    out = fake_run(tmp_path / "run")
    (out / "eval.jsonl").unlink()
    plots = decoded_plots(report.write_report(out).read_text())
    assert len(plots) == 8
    assert all(distinct_colours(img) > 5 for _, img in plots)


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"loss": 1.0}\n'])
def test_missing_or_empty_metrics_is_a_user_error(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    if content is not None:
        (out / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match="metrics.jsonl"):
        report.write_report(out)
    assert not (out / "report.html").exists()


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        report.write_report(tmp_path / "nope")


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html_path: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    binary = chromium_binary()
    assert binary
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
        "--window-size=1200,3000", html_path.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def assert_renders(html_path: Path, tmp_path: Path) -> None:
    """Headless Chromium opens the report and the page is not blank."""
    png = tmp_path / "shot.png"
    proc = screenshot(html_path, png, tmp_path / "profile")
    assert png.is_file() and png.stat().st_size > 0, proc.stderr[-2000:]
    img = Image.open(png)
    assert img.size == (1200, 3000)
    # Plots in many colours, not a white page or an error page.
    assert distinct_colours(img) > 50, "screenshot looks blank"


@pytest.mark.skipif(chromium_binary() is None,
                    reason="no chromium binary (apt-get install -y chromium to run this check)")
def test_report_renders_in_headless_chromium(tmp_path):
    out = fake_run(tmp_path / "run")
    assert_renders(report.write_report(out), tmp_path)
