"""Entry point for `ray job submit --working-dir . -- python jobs/tune.py --sweep tuning/gpt2-124m.yaml`.

Same arguments as `llm-ray tune`. If the job dies, submit it again with --resume: finished
trials are kept, unfinished ones resume from their checkpoints.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds llm_ray/

from llm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
