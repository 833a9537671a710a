"""Alias of `tfsft finetune`: fine-tune, evaluate, save and export one run (see `tfsft finetune --help`)."""

from tfsft.cli import run_command

if __name__ == "__main__":
    run_command("finetune")
