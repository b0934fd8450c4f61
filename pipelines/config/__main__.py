"""``python -m pipelines.config --config FILE [key=value ...]``: print the resolved config."""

import sys

from pipelines.config.cli import main

sys.exit(main())
