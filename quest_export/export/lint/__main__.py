"""``python -m quest_export.export.lint MODEL --target T [--json OUT] [--quantized-layers FILE]``."""

import sys

from quest_export.export.lint.cli import main

sys.exit(main())
