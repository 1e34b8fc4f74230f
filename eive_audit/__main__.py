"""`python -m eive_audit` is the `eive-audit` command."""

from eive_audit.cli import main

main()
