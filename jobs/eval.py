"""Entry point for `ray job submit ... -- python jobs/eval.py -c CONFIG [key=value ...]`.

The same function as `ift eval`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
