"""vltrain's Hydra launchers (Hydra loads launchers from the `hydra_plugins` namespace only): hydra-submitit-
launcher's SLURM and local launchers, whose requeue after preemption or at the time limit first lets the training
processes save a checkpoint, then resubmits the job with `resume=auto` appended to its overrides.
Selected by `hydra/launcher=slurm` (vltrain/conf/hydra/launcher/slurm.yaml)."""

from __future__ import annotations

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _submitit
except ImportError:  # the `slurm` extra is not installed: hydra/launcher=slurm then fails with Hydra's message
    _submitit = None


def _requeueing(base):
    class Requeueing(base):
        def checkpoint(self, sweep_overrides, *args, **kwargs):
            """Called by submitit when SLURM signals preemption or the time limit: the training saves a
            checkpoint (SIGUSR1 to its processes), then the same job is resubmitted with `resume=auto`."""
            from vltrain.sweep import stop_child_with_checkpoint, with_resume

            stop_child_with_checkpoint()
            return super().checkpoint(with_resume(list(sweep_overrides)), *args, **kwargs)

    Requeueing.__name__ = Requeueing.__qualname__ = base.__name__
    Requeueing.__module__ = __name__
    return Requeueing


if _submitit is not None:
    SlurmLauncher = _requeueing(_submitit.SlurmLauncher)

    class LocalLauncher(_requeueing(_submitit.LocalLauncher)):
        """submitit's local executor standing in for SLURM (tests, a workstation): `hydra/launcher=slurm
        hydra.launcher._target_=hydra_plugins.vltrain_launcher.LocalLauncher` runs each point as a local job;
        the SLURM-only settings of the preset are left out."""

        def __init__(self, **params):
            from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

            known = set(LocalQueueConf.__dataclass_fields__)
            super().__init__(**{k: v for k, v in params.items() if k in known})
