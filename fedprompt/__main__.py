import sys

from fedprompt.cli import main

sys.exit(main())
