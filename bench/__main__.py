import sys

from .cli import main
from .malloc import tune_allocator

tune_allocator()
sys.exit(main())
