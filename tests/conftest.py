import os
import sys

# Spawned ranks import test modules by name: make tests/ importable for them.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
