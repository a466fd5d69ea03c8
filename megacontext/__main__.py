"""`python -m megacontext` is the same as the `megacontext` command."""

from megacontext.cli import main

raise SystemExit(main())
