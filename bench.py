import sys

from medusa_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
