"""`python -m vltrain.plan`: the `vltrain plan` command (vltrain/cli/plan.py)."""

if __name__ == "__main__":
    from vltrain.cli import run_module

    run_module("plan")
