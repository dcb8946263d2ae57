"""Entry point for `ray job submit ... -- python jobs/merge.py -c CONFIG [key=value ...]`.

The same function as `ift merge`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge"] + sys.argv[1:]))
