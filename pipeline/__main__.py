"""`python -m pipeline ...` is the `featcache` command."""

from pipeline.app.cli import main

raise SystemExit(main())
