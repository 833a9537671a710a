"""The `tfsft` subcommands, one module each: `build_parser(prog)` and `run(args)`.

`tfsft.cli.main` dispatches to them; `scripts/<name>.py` are aliases of `tfsft <name>`. The
training commands import TensorFlow only inside `run`, after their arguments are checked, so
`tfsft predict` and `tfsft serve` work on the base install (no TensorFlow).
"""

COMMANDS = ("finetune", "evaluate", "export", "predict", "serve")
"""Subcommand names, in pipeline order; each is a module of this package."""

TRAINING_COMMANDS = frozenset({"finetune", "evaluate", "export"})
"""Subcommands that need the `[train]` extra (TensorFlow, transformers, tf2onnx)."""
