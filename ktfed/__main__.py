from ktfed.cli import main
import sys

sys.exit(main())
