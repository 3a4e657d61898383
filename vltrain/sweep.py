"""Launching: the torchrun command of a multi-process run, sweeps' summary table, SLURM jobs with torchrun inside.

- `torchrun_command(...)`: what `NPROC_PER_NODE=N [NNODES= NODE_RANK= MASTER_ADDR= MASTER_PORT=] python -m vltrain`
  and a SLURM job (one task per node) run: `python -m torch.distributed.run ... -m vltrain <overrides>`.
- `train_on_slurm_nodes(...)`: a SLURM job's training, run by torchrun over every GPU of its nodes.
- `SweepSummary`: a Hydra callback; at the end of `python -m vltrain -m ...` it prints one row per job (its
  overrides and final metrics) and writes the table as `summary.md` (and `summary.jsonl`) in the sweep folder.
- `with_resume`, `stop_child_with_checkpoint`: what the SLURM launcher's requeue does (the launcher itself is in
  hydra_plugins/vltrain_launcher, where Hydra looks for launchers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

FINAL_METRICS = "final_metrics.json"
"""The final metrics of a run, written into its run folder by rank 0 (what the sweep summary reads)."""

SUMMARY = "summary.md"


# ---- torchrun ----------------------------------------------------------------------------------------------------


def torchrun_command(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The torchrun command line running `python -m vltrain <argv>` in `nproc` processes on each of `nnodes`
    nodes (c10d rendezvous at master_addr:master_port when several nodes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        if not master_addr:
            raise ValueError("several nodes need MASTER_ADDR (the first node's address)")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port or 29500}"]
    elif master_port:
        cmd += [f"--master_port={master_port}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "vltrain", *argv]


def slurm_torchrun_command(argv: list[str]) -> list[str] | None:
    """Inside a SLURM job with one task per node and several GPUs or nodes: the torchrun command that runs this
    job's training on all of them. None when one process is all there is to start."""
    nnodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS_PER_NODE") or ""
    try:
        nproc = int(gpus.split(":")[-1]) if gpus else 0
    except ValueError:
        nproc = 0
    if not nproc:
        import torch

        nproc = max(1, torch.cuda.device_count())
    if nnodes * nproc <= 1:
        return None
    master = None
    if nnodes > 1:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        master = hosts[0]
    return torchrun_command(nproc, argv, nnodes=nnodes, node_rank=int(os.environ.get("SLURM_NODEID", "0")),
                            master_addr=master, master_port=int(os.environ.get("MASTER_PORT", "29500")))


def train_on_slurm_nodes(overrides: list[str], run_dir: str) -> dict[str, Any] | None:
    """Inside a SLURM job (one task per node, before torchrun): run this job's training in the processes torchrun
    starts on every node and return its final metrics. None when this is not such a job, or one process is all
    there is to start (training then runs here)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "LOCAL_RANK" in os.environ:
        return None
    cmd = slurm_torchrun_command([*overrides, f"hydra.run.dir={run_dir}"])
    if cmd is None:
        return None
    code = run_child(cmd)
    if code != 0:
        sys.exit(f"vltrain: training processes exited with status {code}")
    return json.loads((Path(run_dir) / FINAL_METRICS).read_text(encoding="utf-8"))


_CHILD: subprocess.Popen | None = None
"""The torchrun process this SLURM job started (signalled on preemption)."""


def _ignore_sigusr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_child(cmd: list[str]) -> int:
    """Run `cmd` (torchrun) and wait; its exit status. It runs in a process group of its own, with SIGUSR1
    ignored: torchrun does not forward that signal (it dies of it), so the preemption signal goes to the whole
    group, where the training processes' own handler (installed when training starts) catches it."""
    global _CHILD
    print("vltrain: " + " ".join(cmd), flush=True)
    _CHILD = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_ignore_sigusr1)
    try:
        return _CHILD.wait()
    finally:
        _CHILD = None


def stop_child_with_checkpoint(timeout_s: float = 600) -> None:
    """Ask the training processes to save a checkpoint and stop (SIGUSR1 to torchrun's process group, see
    train/preempt.py); wait for them."""
    child = _CHILD
    if child is None or child.poll() is not None:
        return
    os.killpg(child.pid, signal.SIGUSR1)
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()


# ---- requeue on preemption ---------------------------------------------------------------------------------------


def with_resume(overrides: list[str]) -> list[str]:
    """A job's overrides for its requeued run: `resume=auto` (continue from the run folder's last checkpoint)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("resume=")]
    return [*kept, "resume=auto"]


# ---- sweep summary -----------------------------------------------------------------------------------------------


def write_final_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    from vltrain.files import write_atomic

    write_atomic(Path(run_dir) / FINAL_METRICS, json.dumps(metrics, indent=2, default=float) + "\n")


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep: its number, overrides and final metrics (`failed` when it has none)."""
    import yaml

    rows = []
    for job in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
        metrics_file = job / FINAL_METRICS
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
        rows.append({"job": job.name, "overrides": " ".join(overrides), "metrics": metrics})
    return rows


HIDDEN_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: job, the overrides that differ between jobs, then every metric any job reported."""
    keys: list[str] = []
    for row in rows:
        for k in row["metrics"] or {}:
            if k not in keys and k not in HIDDEN_METRICS:
                keys.append(k)
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| job | overrides | " + " | ".join(keys) + " |", "|" + "---|" * (2 + len(keys))]
    for row in rows:
        values = [cell((row["metrics"] or {}).get(k)) for k in keys] if row["metrics"] else ["failed"] + [""] * (
            len(keys) - 1)
        swept = " ".join(o for o in row["overrides"].split() if o not in common)
        lines.append(f"| {row['job']} | {swept} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """At the end of a multirun: the table of every job's final metrics, printed and written to the sweep
    folder (`summary.md`, and `summary.jsonl` for programs)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vltrain.context import process

        if not process().is_main:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = sweep_rows(sweep_dir)
        table = summary_table(rows)
        (sweep_dir / SUMMARY).write_text(table, encoding="utf-8")
        with (sweep_dir / "summary.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"\nsweep summary ({sweep_dir / SUMMARY}):\n{table}", flush=True)
