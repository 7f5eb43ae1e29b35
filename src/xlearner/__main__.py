"""`python -m xlearner`: the same command as `xlearner`."""
import sys

from xlearner.cli import main

sys.exit(main())
