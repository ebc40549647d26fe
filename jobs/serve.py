"""Entry point for `ray job submit -- python jobs/serve.py --config examples/serve_cli.yaml`.

Takes exactly the flags of `raykit serve` and deploys the app on the job's cluster, then returns
(`--detach`): the app keeps serving after the job ends; `serve shutdown` removes it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykit.cli import main

if __name__ == "__main__":
    main(["serve", "--detach", *sys.argv[1:]])
