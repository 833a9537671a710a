"""Alias of `tfsft evaluate`: score a saved run on another labeled file (see `tfsft evaluate --help`)."""

from tfsft.cli import run_command

if __name__ == "__main__":
    run_command("evaluate")
