"""`python -m gbsd_core.cli ...` is the `gbsd` command."""
import sys

from .main import main

sys.exit(main())
