import sys

from .http.launch import main

sys.exit(main())
