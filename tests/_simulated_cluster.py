"""A simulated Ray cluster (ray.cluster_utils) whose nodes come and go, in a process of its own, for
tests/test_cluster.py: a head with no CPUs (the driver and Ray Train's controller live there; training
workers cannot) and two nodes of 1 CPU. Prints {"address", "nodes"} as one JSON line, then obeys lines on
stdin: "remove" (the last node added goes, as a lost machine: SIGKILL), "add" (a new 1-CPU node), anything
else only asks; each answers with the ids of the nodes with CPUs as one JSON line. Ends when stdin closes."""

import json
import sys

from ray.cluster_utils import Cluster

from llm_ray.ray_utils import single_machine

if __name__ == "__main__":
    single_machine()  # the simulated nodes listen on 127.0.0.1
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": int(sys.argv[1]),
        # a lost node is noticed in about 3 s (Ray's default: 30 s)
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "nodes": [n.node_id for n in nodes]}), flush=True)
    for line in sys.stdin:
        if line.strip() == "remove":
            cluster.remove_node(nodes.pop(), allow_graceful=False)
        elif line.strip() == "add":
            nodes.append(cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1"))
            cluster.wait_for_nodes()
        print(json.dumps([n.node_id for n in nodes]), flush=True)
    cluster.shutdown()
