"""How dual sampling reaches the engine(s), one module per `sample.transport`.

- request.py: two servers, a stateless `/v1/completions` request per step and server.
- session.py: two servers, resident vLLM sessions over one WebSocket per server.
  Both implement the coordinator's per-token `Transport` protocol (coordinator.py): the
  coordinator merges the two top-k lists, solves alpha* and samples on the client.
- fused.py: one server holding both models (start_vllm.sh --fused): whole completions
  sampled inside vLLM from the exact full-vocabulary q*; no per-token round trip.
"""
