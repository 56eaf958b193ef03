"""python -m bn_gpu: the command line of bn_gpu.tools.commands."""
import sys

from .tools.commands import main

if __name__ == "__main__":
    sys.exit(main())
