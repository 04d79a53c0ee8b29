"""Score a checkpoint on its run's held-out documents (loss, perplexity, bits per byte, BLEU/ROUGE, contamination).

Run as `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/eval.py --checkpoint runs/gpt2-124m/checkpoints/...`.
Same arguments as `llm-ray eval`; `llm-ray preflight` runs first and stops the job on a failed check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("eval"))
