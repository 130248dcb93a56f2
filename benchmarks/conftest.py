import os
import sys

# the bench_*.py files import their shared helpers as `common`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
