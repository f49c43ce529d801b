"""jachat-bench: load, compare, soak and abuse the service (see cli.py); and the launcher that runs jachat-serve
as a child process for it and for the tests."""
