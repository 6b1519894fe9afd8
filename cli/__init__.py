"""The `cas` command line: argument parsing, passwords, output and exit codes."""
