"""`python -m vltrain.infer`: the `vltrain infer` command (vltrain/cli/infer.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("infer")
