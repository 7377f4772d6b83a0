"""Start a local N-process JAX run of one command (the launcher the multi-process tests use):

    python scripts/launch_local.py -n 2 --cpu-devices 4 -- python -m jq qat --model tiny --steps 2 --seq-len 32

See `jq.apps.launch` and docs/MULTIHOST.md."""

import sys

from jq.apps.launch import main

if __name__ == "__main__":
    sys.exit(main())
