"""Alias of `tfsft serve`: serve an ONNX bundle over HTTP (see `tfsft serve --help`)."""

from tfsft.cli import run_command

if __name__ == "__main__":
    run_command("serve")
