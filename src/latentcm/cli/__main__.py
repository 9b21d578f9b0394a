"""``python -m latentcm.cli ...`` (as ``accelerate launch -m latentcm.cli distill ...`` runs it)."""
from .app import main

if __name__ == "__main__":
    main()
