"""``python -m accounting epsilon ...`` is the same as ``dp-microclip epsilon ...``."""

from accounting.cli import main

raise SystemExit(main())
