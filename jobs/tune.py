"""Entry point for `ray job submit ... -- python jobs/tune.py -c CONFIG [key=value ...]`.

The same function as `ift tune`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune"] + sys.argv[1:]))
