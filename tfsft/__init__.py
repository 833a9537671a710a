"""tfsft: supervised fine-tuning of BERT-family encoders with TensorFlow/Keras, served with ONNX.

Importing the package is cheap and TensorFlow-free; `finetune` imports TensorFlow on first use.
"""

from tfsft.config import RunConfig
from tfsft.errors import ArtifactError, ConfigError, DataError, TfsftError

__version__ = "0.1.0"


def finetune(config, callbacks=None, verbose=1):
    """Run a complete fine-tuning job; see `tfsft.pipeline.finetune`."""
    from tfsft.pipeline import finetune as _finetune

    return _finetune(config, callbacks=callbacks, verbose=verbose)


__all__ = ["RunConfig", "TfsftError", "ConfigError", "DataError", "ArtifactError", "finetune"]
