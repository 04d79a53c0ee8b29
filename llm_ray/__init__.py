"""llm-ray: raw text to a trained, served GPT-style model on a Ray cluster."""

import time

__version__ = "0.1.0"
# When this process first imported llm_ray: for a command (`llm-ray ...`, a job's entry point), its start.
STARTED = time.time()
# When this command reached each milestone of its start-up (time.time()): "ray" once Ray is up, "trainer" as
# training is handed to Ray Train. The workers add theirs; train_state.json's startup_phases records them all.
MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    MARKS[name] = time.time()
