"""vltrain models (also python -m vltrain.models): the supported model types as a Markdown table (hub ids,
backbones, template, tile budget, parameters by part counted on the `meta` device; vltrain.model.catalog).

Run as:
    vltrain models
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if argv:
        print(f"vltrain.models: takes no arguments, got {' '.join(argv)}", file=sys.stderr)
        return 2
    from vltrain.model.catalog import table

    print(table())
    return 0
