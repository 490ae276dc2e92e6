"""One module per subcommand; see batchgen/cli.py for the contract."""
