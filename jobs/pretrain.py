"""Train on data prepared before (jobs/prepare.py); resubmitting the same run name resumes from its newest checkpoint.

Run as `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pretrain.py --config gpt2-124m`.
Same arguments as `llm-ray train`; `llm-ray preflight` runs first and stops the job on a failed check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("train"))
