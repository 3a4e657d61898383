"""The `vltrain` command: `vltrain <command> [key=value ...]`, one module per command in this package.

Every command takes the same Hydra overrides as training (`model=internvl2-8b dataset.train=[my.jsonl] ...`) and
`--help`. A command module has `main(argv) -> int`: it composes and validates its config
(`vltrain.config.compose_command` / `resolve_config`) and calls one library function; library modules never
import this package. `vltrain key=value ...` without a command trains (as `python -m vltrain` always has);
`python -m vltrain <command>` and `python -m vltrain.<command>` run the same code.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module with `main(argv) -> int`, what it does). A new command is one line here.
COMMANDS = {
    "train": ("vltrain.cli.train", "fine-tune a model (the default when no command is given)"),
    "check": ("vltrain.cli.check", "check and show the training data as the model sees it"),
    "infer": ("vltrain.cli.infer", "chat with a model or checkpoint, or score it on held-out rows"),
    "export": ("vltrain.cli.export", "merge LoRA adapters, or write the original InternVL layout"),
    "serve": ("vltrain.cli.serve", "an OpenAI-compatible chat completions server for a checkpoint or a model"),
    "plan": ("vltrain.cli.plan", "parameters by part and the memory per GPU of a training run"),
    "convert": ("vltrain.cli.convert", "an original InternVL checkpoint -> an HF-native model folder"),
    "models": ("vltrain.cli.models", "the supported model types, with parameter counts"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: vltrain [command] [key=value ...] [--help]\n\ncommands:\n{rows}\n\n"
            "Without a command, vltrain trains. `vltrain <command> --help` describes a command and its keys.")


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` / `--local_rank N` the `deepspeed` launcher passes (Hydra's parser rejects it);
    the rank goes into LOCAL_RANK, where the process context reads it."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank"):
            if i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """`vltrain [command] ...`: dispatch to the command's module."""
    argv = strip_local_rank(sys.argv[1:] if argv is None else list(argv))
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] in COMMANDS:
        name, argv = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-") and "=" not in argv[0]:
        from vltrain.config import suggest

        print(f"vltrain: unknown command '{argv[0]}'{suggest(argv[0], COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    else:
        name = "train"
    return importlib.import_module(COMMANDS[name][0]).main(argv)


def entry() -> None:
    """The `vltrain` console script."""
    sys.exit(main())


def run_module(name: str) -> None:
    """`python -m vltrain.<name> ...`: the same as `vltrain <name> ...`."""
    sys.exit(main([name, *sys.argv[1:]]))


def run_command(prog: str, command, argv: list[str], help_text: str = "") -> int:
    """Run `command(argv)` as `prog`: `-h` / `--help` prints `help_text`; a ConfigError (or Hydra's own
    composition error) is one line on stderr and exit status 2, never a traceback."""
    from hydra.errors import HydraException

    from vltrain.config import ConfigError

    if help_text and any(a in ("-h", "--help") for a in argv):
        print(help_text)
        return 0
    try:
        return command(argv)
    except (ConfigError, HydraException) as e:
        text = str(e).strip()
        print(f"{prog}: {text if isinstance(e, ConfigError) else text.split(chr(10) * 2)[0]}", file=sys.stderr)
        return 2
