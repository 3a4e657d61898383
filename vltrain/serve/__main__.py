"""`python -m vltrain.serve`: the `vltrain serve` command (vltrain/cli/serve.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("serve")
