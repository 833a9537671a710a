"""Alias of `tfsft export`: export a finished run to a verified ONNX bundle (see `tfsft export --help`)."""

from tfsft.cli import run_command

if __name__ == "__main__":
    run_command("export")
