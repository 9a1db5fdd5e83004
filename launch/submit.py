"""Submit extraction and training with submitit: the same as `candle-dist submit`.

Example: python launch/submit.py --config configs/inat2018.yaml --nodes 2 --gpus-per-node 8
"""

import sys

from candle_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
