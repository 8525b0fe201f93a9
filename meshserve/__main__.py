"""`python -m meshserve`: the `meshserve` command."""
import sys

from meshserve.orchestrator.cli import main

sys.exit(main())
