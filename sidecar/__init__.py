"""specdec-sidecar: is vLLM speculative decoding paying for itself, per workload, in production?"""

__version__ = "0.1.0"
