"""`python -m pipeline ...` is the `featcache` command."""

from .cli import main

raise SystemExit(main())
