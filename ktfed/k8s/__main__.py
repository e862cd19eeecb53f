"""`python -m ktfed.k8s ...`: the k8s commands without the rest of the CLI (the pods' exec probes)."""
import sys

from ktfed.k8s import main

sys.exit(main())
