"""`python -m vltrain.check`: the `vltrain check` command (vltrain/cli/check.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("check")
