"""Quantization-aware fine-tuning (same as `jq qat`): see `jq.models.finetune`."""

import sys

from jq.models.finetune import main

if __name__ == "__main__":
    sys.exit(main())
