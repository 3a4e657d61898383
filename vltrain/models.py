"""`python -m vltrain.models`: the `vltrain models` command (vltrain/cli/models.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("models")
