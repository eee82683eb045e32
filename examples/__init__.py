"""Example LightningModules, DataModules and the Hydra training app (``examples/train.py``)."""
