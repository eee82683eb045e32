"""One-process data parallelism on any list of devices (CPU included), in the order a step runs:

- :mod:`~.batch`: split a batch along dim 0 into shards;
- :mod:`~.replicate`: one replica of the module per device, sharing parameters through autograd;
- :mod:`~.parallel_apply`: run each replica's step on its shard, one thread per device;
- :mod:`~.replica_results`: merge the replicas' ``self.log`` calls and metric states into the root;
- :mod:`~.gather`: gather the outputs on one device, the loss as the full-batch mean.

The Lightning strategy on top: :mod:`lightning_gpupar.strategies.dp`.
"""
