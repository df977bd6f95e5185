import os

# tests/ and examples/ are importable through pytest's `pythonpath` option (setup.cfg): test modules and
# tests/helpers/ by name, also in the ranks that tests/helpers/distributed.py spawns (they inherit sys.path).
os.environ.setdefault("OMP_NUM_THREADS", "1")
