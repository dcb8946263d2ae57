"""Entry point for `ray job submit ... -- python jobs/predict.py -c CONFIG [key=value ...]`.

The same function as `ift predict`; arguments pass through unchanged.
"""

import sys

from ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict"] + sys.argv[1:]))
