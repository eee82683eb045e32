"""The one home of shared test helpers: models and harnesses (equivalence, checkpoints, dp), markers, and
``programs/``: scripts the tests run as real processes (DDP ranks, torchrun nodes, concurrent savers)."""
