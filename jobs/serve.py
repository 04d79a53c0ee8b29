"""Entry point for `ray job submit --working-dir . -- python jobs/serve.py --run demo`.

Same arguments as `llm-ray serve`: the job keeps the app up until it is stopped
(`ray job stop`). For a long-lived service, `serve deploy jobs/serve_config.yaml` (or a
KubeRay RayService) manages the app without a job holding it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds llm_ray/

from llm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
