import sys

from aimpre.cli import main

sys.exit(main())
