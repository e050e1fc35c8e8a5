"""The request tap: a byte-exact proxy to vLLM, the observers that read beside it, and per-request metrics."""
