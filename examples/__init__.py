"""Example user modules; a config names their classes by dotted path (``examples.my_optimizers:SignSGD``)."""
