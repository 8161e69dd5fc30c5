"""``python -m cli``: the same as the ``mirrorline`` console script."""

from __future__ import annotations

import sys

from cli.main import main

sys.exit(main())
