"""Training: the stage recipes (``recipe``, standard library only), the packed loss under
context and data parallelism (``loss``), the policies applied to the model from outside
(``parallelize``), checkpoints (``checkpoint``) and the trainer that steps them
(``trainer``). Import the modules themselves: ``recipe`` and ``checkpoint`` are read by
the command line before torch loads, so this package imports nothing."""
