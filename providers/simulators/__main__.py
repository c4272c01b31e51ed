"""`python -m providers.simulators KIND [--port N] [--config JSON]`: one simulator in the
foreground, with any `SimConfig` knobs set from a JSON object (the same fields as
`POST /_sim/config`). `flux-proxy simulate` is the everyday command; this one needs
nothing of the proxy, so a benchmark can run this checkout's simulators next to an
exported proxy."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence

from .config import SimConfig
from .server import serve


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m providers.simulators", description=__doc__)
    ap.add_argument("kind", choices=["vibedream", "wavespeed"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="default: 8701 / 8702")
    ap.add_argument("--config", default="{}", help="knobs as JSON, e.g. '{\"cost_cents\": 3}'")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    config = SimConfig()
    try:
        changes = json.loads(args.config)
        if not isinstance(changes, dict):
            raise ValueError("--config must be a JSON object")
        config.update(changes)
    except ValueError as exc:
        ap.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is how it is stopped
        serve(args.kind, host=args.host, port=args.port, config=config, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
