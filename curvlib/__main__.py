"""``python -m curvlib``: the ``curvlib`` command (see :mod:`curvlib.cli`)."""

from curvlib.cli import main

raise SystemExit(main())
