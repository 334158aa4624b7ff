"""Link benchmark on the local stack: the same as `kiosk bench link` (run as root).

    .venv/bin/python benchmarks/bench_link.py [--quick] [--write docs/performance.md]
"""

from __future__ import annotations

import sys

from kiosk.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "link", *sys.argv[1:]]))
