import sys

from tasprune.cli import main

sys.exit(main())
