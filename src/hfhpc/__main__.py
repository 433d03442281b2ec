import sys

from hfhpc.cli.main import main

sys.exit(main())
