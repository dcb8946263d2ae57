"""Entry point for `ray job submit ... -- python jobs/serve.py -c CONFIG [key=value ...]`.

The same function as `ift serve`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve"] + sys.argv[1:]))
