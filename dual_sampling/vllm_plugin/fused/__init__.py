"""The one-engine path: both models (theta and the target) in ONE vLLM engine.

start_vllm.sh --fused serves this; the client side is dual_sampling/core/transports/fused.py.

- maths/kernels.py (outside this folder: the exact two-engine coordinator uses it too): the
  torch math on the logits' device (alpha*, q*, sampling, diagnostics), compiled fused
  passes over the vocabulary; maths/mixture.py stays the numpy reference.
- model.py: `DualSamplingMixtureForCausalLM`, both checkpoints as submodules of one vLLM model.
- route.py: `POST /v1/dual_sampling/fused/generate` and the engine's checks and counters.
- sampler.py: `FusedSampler`, the logits processor that solves alpha* and samples each token.
- setup.py: the pair's guards and the server arguments (`python -m` this module).
- speculate.py / verify.py: the speculative mode (vLLM glue / the verify step's math).
- state.py: worker-process state (logits stash, per-token records, counters) and its RPCs.
- stock.py: what a stock OpenAI request may ask of a fused server.
"""
