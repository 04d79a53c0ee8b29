"""A Ray Tune sweep (Bayesian by default); after a failure, submit it again with --resume.

Run as `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune.py --sweep tuning/gpt2-124m.yaml`.
Same arguments as `llm-ray tune`; `llm-ray preflight` runs first and stops the job on a failed check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("tune"))
