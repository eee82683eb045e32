"""The DDP engine under :mod:`lightning_gpupar.strategies.ddp`: the Hydra-aware launcher (:mod:`.launcher`),
SIGTERM agreement across ranks (:mod:`.signals`) and option and launch checks (:mod:`.checks`).
See docs/ddp.md."""
