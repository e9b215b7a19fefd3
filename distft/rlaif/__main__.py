import sys

from distft.rlaif.main import main

sys.exit(main())
