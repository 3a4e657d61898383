"""Run-folder outputs written during training: logging.jsonl, the loss-curve PNG, per-checkpoint run files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from vltrain.config import RUN_CONFIG


class JsonlLogger(TrainerCallback):
    """Appends every logged dict, with step, epoch and elapsed seconds, to `<run_dir>/logging.jsonl`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "logging.jsonl"
        self.start = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs,
               "elapsed_s": round(time.monotonic() - self.start, 2)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


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


class CheckpointRunFiles(TrainerCallback):
    """Writes the resolved run config into every checkpoint, so inference and resume need nothing re-typed."""

    def __init__(self, run_config_text: str):
        self.text = run_config_text

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (ckpt / RUN_CONFIG).write_text(self.text, encoding="utf-8")


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
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
