"""``python -m forgeone_isolate``."""

from forgeone_isolate.cli import main

raise SystemExit(main())
