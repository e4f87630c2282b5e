"""Subcommands of the ``vdpacert`` CLI, one module each."""
