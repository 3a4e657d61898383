"""`python -m vltrain [command] ...`: the `vltrain` command (vltrain/cli/); without a command it trains."""

from vltrain.cli import entry

if __name__ == "__main__":
    entry()
