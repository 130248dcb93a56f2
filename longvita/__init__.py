"""longvita: custom-kernel-first PyTorch library for Long-VITA vision-language models.

Layers (dependencies point downward): kernels <- model <- dist <- cli; data beside model.
``import longvita.kernels`` does not load the model; ``longvita.LongVITA`` loads lazily.
"""

__version__ = "0.1.0"

__all__ = ["LongVITA", "LongVITAConfig", "__version__"]


def __getattr__(name):
    if name in ("LongVITA", "LongVITAConfig"):
        from longvita import model

        return getattr(model, name)
    raise AttributeError(f"module 'longvita' has no attribute {name!r}")
