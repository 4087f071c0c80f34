import sys

from dplora_ray.cli import main

sys.exit(main())
