"""distill: teach Vision Transformers from other networks or from themselves."""

__version__ = "0.1.0"
