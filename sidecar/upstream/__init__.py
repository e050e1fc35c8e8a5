"""Reading vLLM: fetch /metrics, parse the text format, map vLLM's names, poll on a clock, derive windows."""
