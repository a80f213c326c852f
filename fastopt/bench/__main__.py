import sys

from fastopt.bench import main

sys.exit(main())
