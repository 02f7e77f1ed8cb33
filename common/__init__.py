"""What both processes share: the wire protocol, the request rules, logging, tracing and graceful drain.
It imports neither the gateway (service) nor the worker (model_server)."""
