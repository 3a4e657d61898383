"""Run-folder outputs written during training: logging.jsonl and the loss-curve PNG (the run files of every
checkpoint are written by `vltrain.train.checkpoint` when it publishes one)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from vltrain.files import write_atomic
from vltrain.manifest import LOG_FILE


class JsonlLogger(TrainerCallback):
    """Appends every logged dict, with step, epoch and elapsed seconds, to `<run_dir>/logging.jsonl`.

    `resume_step` (a resumed run's main process): the rows the interrupted run logged after that step (and its
    closing summary) are dropped first, so every step appears once; elapsed seconds continue."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.start = time.monotonic()
        if resume_step is not None and self.path.is_file():
            rows = [_row(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
            rows = [r for r in rows if r is not None]  # a line cut short by the kill is dropped
            kept = [r for r in rows if r.get("step", 0) <= resume_step and "train_runtime" not in r]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.start -= max((r.get("elapsed_s", 0.0) for r in kept), default=0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs,
               "elapsed_s": round(time.monotonic() - self.start, 2)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class LossPlot(TrainerCallback):
    """Draws `<run_dir>/images/loss.png` (train and eval loss, held-out exact match) after each evaluation."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "images" / "loss.png"

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_history(state.log_history, self.path)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_history(state.log_history, self.path)


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "train loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "eval loss": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
    }
    accuracy = [(h["step"], h["eval_exact_match"]) for h in history if "eval_exact_match" in h]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if accuracy:
        acc_ax = ax.twinx()
        acc_ax.plot(*zip(*accuracy), color="tab:green", marker="o", label="eval exact match")
        acc_ax.set_ylabel("exact match")
        acc_ax.set_ylim(0, 1)
        acc_ax.legend(loc="upper right")
    if any(series.values()):
        ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
