"""What runs a model: generation (``generation.generate``: one decode loop, a local and a
context-parallel plan), sampling, and training (``runtime.train``: recipe, loss,
parallelize, checkpoints, trainer). Imports ``parallel``, ``model`` and ``data``.

The names below load lazily: ``longvita.runtime.train.recipe`` is read by the command line
before torch is imported, and importing this package must not pull torch in."""

__all__ = ["ContextParallelPlan", "GenerationStats", "LocalPlan", "NonFiniteLogits", "Sampling", "generate"]


def __getattr__(name):
    if name == "Sampling":
        from longvita.runtime.sampling import Sampling

        return Sampling
    if name in __all__:
        from longvita.runtime import generation as module

        return getattr(module, name)
    raise AttributeError(f"module 'longvita.runtime' has no attribute {name!r}")
