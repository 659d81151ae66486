"""``python -P -m appliance.process <fd>``: how the parent (process/handle.py) starts every child process."""

import sys

from appliance.process.bootstrap import from_parent

if __name__ == "__main__":
    from_parent(int(sys.argv[1]))
