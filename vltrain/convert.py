"""`python -m vltrain.convert`: the `vltrain convert` command (vltrain/cli/convert.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("convert")
