"""The whole pipeline on the cluster: prepare, train, sample, evaluate.

Run as `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pipeline.py --config gpt2-124m`.
Same arguments as `llm-ray pipeline`; `llm-ray preflight` runs first and stops the job on a failed check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("pipeline"))
