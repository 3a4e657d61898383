"""`python -m vltrain.export`: the `vltrain export` command (vltrain/cli/export.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("export")
