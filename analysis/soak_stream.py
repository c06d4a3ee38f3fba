"""``python -m analysis.soak_stream``: streams of hours, accelerated (:mod:`analysis.cli.soak_stream`)."""

import sys

from analysis.cli.soak_stream import main

if __name__ == "__main__":
    sys.exit(main())
