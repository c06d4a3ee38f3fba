"""``python -m analysis.eval_stream``: the accuracy harness (:mod:`analysis.cli.eval_stream`)."""

import sys

from analysis.cli.eval_stream import main

if __name__ == "__main__":
    sys.exit(main())
