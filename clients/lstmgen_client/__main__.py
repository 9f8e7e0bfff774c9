"""`python -m lstmgen_client generate ...`: the `lstmgen-client` command."""
import sys

from lstmgen_client.cli import main

sys.exit(main())
