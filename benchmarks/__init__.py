"""Speed, memory and accuracy scripts for cops-hf (run as `python -m benchmarks.<name>` from the repository root)."""
