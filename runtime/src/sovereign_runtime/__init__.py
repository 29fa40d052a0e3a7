"""sovereign-runtime: the PyTorch inference server of the sovereign.mlops collection."""

__version__ = "0.1.0"
