"""Make `pipelines` importable when a job runs as `python jobs/<stage>.py` from a checkout.

Python puts `jobs/` (not the repository root) on sys.path for a script; this adds the root,
which is also Ray's working dir after `ray job submit --working-dir .`.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS = REPO_ROOT / "jobs" / "configs"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
