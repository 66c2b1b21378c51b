"""How the service reaches Redis: the pipelined connection (pipelined_redis.py), the backends for
one node, Sentinel and Cluster with replica acknowledgements (redis_backends.py), and the private
redis-server of --dev and the tests (embedded_redis.py)."""
