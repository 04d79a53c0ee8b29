"""Entry point for `ray job submit --working-dir . -- python jobs/pipeline.py --config demo`.

Runs prepare -> train -> samples on the cluster the job was submitted to (Ray sets
RAY_ADDRESS for the job). Same arguments as `llm-ray pipeline`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds llm_ray/

from llm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
