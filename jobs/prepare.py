"""Entry point for `ray job submit ... -- python jobs/prepare.py -c CONFIG [key=value ...]`.

The same function as `ift data prepare`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare"] + sys.argv[1:]))
