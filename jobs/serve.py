"""Serve a checkpoint (or a run's or sweep's best) behind the OpenAI-compatible API until `ray job stop`.
For a long-lived service, `serve deploy jobs/serve_config.yaml` or a KubeRay RayService (cluster/kuberay/).

Run as `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/serve.py --run gpt2-124m`.
Same arguments as `llm-ray serve`; `llm-ray preflight` runs first and stops the job on a failed check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("serve"))
