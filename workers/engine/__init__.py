"""The robustscope engine: attacks, benchmarks, datasets and model loading, in plain PyTorch."""

import torch

__version__ = "0.1.0"
ENGINE_VERSION = f"{__version__}+torch{torch.__version__}"
