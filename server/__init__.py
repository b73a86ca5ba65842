"""certserve's entry points. For now only the command-line dispatcher (:mod:`server.cli`)."""
