"""python -m verification [--quick] [--rule package.module:factory] [--json PATH] ..."""

import sys

from verification.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
