"""`python -m benchmarks.e2e ...`: the end-to-end benchmark (same as `maskformer bench`; see maskformer/bench.py)."""
import sys

from maskformer.bench import main

if __name__ == "__main__":
    sys.exit(main())
