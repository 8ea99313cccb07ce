"""One vLLM server seen from the coordinator: HTTP, retries, logprob requests."""
