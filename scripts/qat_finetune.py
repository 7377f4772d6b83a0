"""Quantization-aware fine-tuning (same as `jq qat`): see `jq.apps.finetune`."""

import sys

from jq.apps.finetune import main

if __name__ == "__main__":
    sys.exit(main())
