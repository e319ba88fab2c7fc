"""`kiln bench`: latency and throughput of an engine, side by side with transformers."""
