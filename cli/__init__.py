"""The `llmctl` command: a thin layer of argparse over the library functions in trainer/ and cli/."""
