"""``python -m vdpacert`` runs the CLI."""

from .cli import main

raise SystemExit(main())
