import sys

from movekd.cli import main

sys.exit(main())
