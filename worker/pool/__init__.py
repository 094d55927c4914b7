"""Which partitions this worker runs, agreed with its peers through leases,
and the interface (``PartitionListener``) through which it drives lanes."""

__all__: list[str] = []
