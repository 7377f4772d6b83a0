"""`python -m jq ...`: the `jq` command line (`jq.apps.cli`)."""

from jq.apps.cli import entry

entry()
