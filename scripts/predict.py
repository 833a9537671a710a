"""Alias of `tfsft predict`: predict every line of a file with an ONNX bundle (see `tfsft predict --help`)."""

from tfsft.cli import run_command

if __name__ == "__main__":
    run_command("predict")
