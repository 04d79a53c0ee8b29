"""A simulated two-node Ray cluster (ray.cluster_utils) for tests/test_cluster.py, in a process of its own:
prints {"address", "nodes"} as one JSON line, then runs until its stdin closes."""

import json
import sys

from ray.cluster_utils import Cluster

from llm_ray.ray_utils import single_machine

if __name__ == "__main__":
    single_machine()  # the simulated nodes listen on 127.0.0.1
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": int(sys.argv[1])})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "nodes": [cluster.head_node.node_id, worker.node_id]}), flush=True)
    sys.stdin.read()
    cluster.shutdown()
