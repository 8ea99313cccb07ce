"""The load_theta protocol's names, shared by the server (dual_sampling/vllm_plugin/
theta_route.py, session.py) and the clients (client.py, http_client.py, transports/session.py).

    POST PATH {"path": dir}  ->  {"theta_version", "theta_path", "load_s"}

Every HTTP reply carries VERSION_HEADER (the theta_version it ran on). A request carrying
PIN_HEADER: N is refused once the server serves another version: HTTP 409 with the error
type CHANGED, or, on the session WebSocket, an error frame whose message starts with
CHANGED_PREFIX.
"""
PATH = "/v1/dual_sampling/load_theta"
VERSION_HEADER = "x-dual-sampling-theta-version"
PIN_HEADER = "x-dual-sampling-pin-theta-version"
CHANGED = "ThetaChanged"
CHANGED_PREFIX = "theta changed"
