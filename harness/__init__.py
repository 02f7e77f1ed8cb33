"""Start real servers (workers, gateways, redis, a llama.cpp judge) as child processes on loopback: shared by
the tests and the load-test scripts."""
