"""One module per ``preftune`` command: each parses its options (from the config dataclasses, see
:mod:`.options`) and calls the library. The command table is :data:`preftune.cli.COMMANDS`."""
