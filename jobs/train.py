"""Entry point for `ray job submit ... -- python jobs/train.py -c CONFIG [key=value ...]`.

The same function as `ift train`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
