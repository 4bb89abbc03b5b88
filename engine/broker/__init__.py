"""Scale-out on NATS JetStream (``tidegate serve --broker``): the cluster harness, the
partitioned event stream, the ingest publisher and the partition worker.

Without ``--broker`` nothing here runs: the embedded engine is unchanged.
"""
