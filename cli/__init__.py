"""The ``certserve`` command line root: every package registers the subcommands it owns here (see :mod:`cli.main`)."""
