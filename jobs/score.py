"""Entry point for `ray job submit -- python jobs/score.py --config examples/score.yaml`.

Takes exactly the flags of `raykit score`. Inside a Ray job, `ray.init()` connects to the
job's cluster (RAY_ADDRESS is set by the job server); it never starts a second one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykit.cli import main

if __name__ == "__main__":
    main(["score", *sys.argv[1:]])
