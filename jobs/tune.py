"""Entry point for `ray job submit -- python jobs/tune.py --config examples/tune.yaml`.

Takes exactly the flags of `raykit tune` and connects to the job's cluster.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykit.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
