"""llm-ray: raw text to a trained, served GPT-style model on a Ray cluster."""

import time

__version__ = "0.1.0"
# When this process first imported llm_ray: for a command (`llm-ray ...`, a job's entry point), its start.
STARTED = time.time()
