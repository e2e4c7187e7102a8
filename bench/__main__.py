import sys

from .cli import main
from .memory import tune_allocator

tune_allocator()
sys.exit(main())
