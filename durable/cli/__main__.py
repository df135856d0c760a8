"""`python -m durable.cli`: the `durable` command."""

import sys

from durable.cli import main

sys.exit(main())
