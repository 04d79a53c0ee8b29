"""Ray Serve's deployment options from a ServeConfig: replicas, autoscaling, queues, resources."""

from __future__ import annotations

from llm_ray.config.serve import ServeConfig


def deployment_options(cfg: ServeConfig) -> dict:
    """Ray Serve deployment options from the config."""
    options = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options
