from __future__ import annotations

import sys

from meshnode.cli import main

sys.exit(main())
