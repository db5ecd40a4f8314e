"""``python -m bench.chaos ROOT DEADLINE SEED WAIT_S``: one chaos client process
(see :func:`bench.chaos.client.client_main`)."""

from __future__ import annotations

import sys

from bench.chaos.client import client_main

if __name__ == "__main__":
    raise SystemExit(client_main(sys.argv[1:]))
