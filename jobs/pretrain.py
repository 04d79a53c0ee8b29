"""Entry point for `ray job submit --working-dir . -- python jobs/pretrain.py --config demo`.

Trains on data that `llm-ray prepare` (or jobs/pipeline.py) already wrote; same arguments
as `llm-ray train`. Rerunning with the same run name resumes from its latest checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds llm_ray/

from llm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
