"""``python -m shim`` is the ``husk`` command."""

import sys

from shim.cli import main

sys.exit(main())
