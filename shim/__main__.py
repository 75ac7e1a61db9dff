"""``python -m shim`` is the ``husk`` command."""

import sys

from shim.cli.main import main

sys.exit(main())
