"""The pipeline runtime: loading, partition, transport, stages, schedule, coordinator."""
