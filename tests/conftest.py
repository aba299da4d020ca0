"""Put the repository root on sys.path so tests can `import warp_min` however pytest is started."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
