"""Profile our training step with torch.profiler (docs/PERFORMANCE.md); logic in gist/analysis/profile_step.py.

python scripts/profile_step.py                          # fp32, the bench's cached-guide setting
python scripts/profile_step.py --precision bf16-mixed --out profile_bf16.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gist.analysis.profile_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
